"""The report's "Data" section: the images per dataset in and out, the reasons, the input QC's distributions and
flags, covariate gaps, and the mosaic of the worst-scoring images (from the qc rule: data_summary.json, qc.tsv,
worst.png)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from brainddpm.data.manifest import read_tsv
from brainddpm.data.qc import gap_sentences
from brainddpm.evaluation.report.common import md_table
from brainddpm.fileio import atomic_path

# qc.tsv's measures, as the section names them
MEASURES = {"dice_template": "Dice with the template brain", "border_fraction": "brain on the FOV border (fraction)",
            "outside_template": "image outside the template brain (fraction)", "brain_volume_ml": "brain volume (ml)",
            "normalized_mean": "normalised brain intensity"}


def _counts_table(summary: dict) -> str:
    rows = [[name, str(d["found"]), str(d["in"]), str(d["out"]), str(d["flagged"])]
            for name, d in summary["datasets"].items()]
    return md_table(["dataset", "images found", "in", "left out", "flagged by QC"], rows)


def _reasons(summary: dict) -> list[str]:
    lines = []
    for name, d in summary["datasets"].items():
        lines += [f"- {name}: {count} left out: {reason}" for reason, count in d["reasons"].items()]
        lines += [f"- {name}: {sentence}" for sentence in gap_sentences(d)]
    return lines or ["- nothing was left out, and every image has its covariates"]


def _distributions(rows: list[dict]) -> str:
    table = []
    for key, name in MEASURES.items():
        values = np.asarray([float(r[key]) for r in rows if r[key] not in ("", "n/a")])
        if values.size:
            low, median, high = np.percentile(values, [0, 50, 100])
            table.append([name, f"{low:.4g}", f"{median:.4g}", f"{high:.4g}"])
    return md_table(["QC measure", "min", "median", "max"], table)


def _reference_table(rows: list[dict]) -> list[str]:
    """Preprocessing checked against known brain masks (datasets with `reference_mask`): Dice per image."""
    checked = [r for r in rows if r.get("dice_reference") not in (None, "", "n/a")]
    if not checked:
        return []
    table = md_table(["image", "dataset", "Dice with its reference mask", "Dice with the template brain", "decision"],
                     [[Path(r["path"]).name, r["dataset"], f"{float(r['dice_reference']):.3f}",
                       f"{float(r['dice_template']):.3f}", r["decision"]] for r in checked])
    return ["Brains recovered, against the reference masks that the datasets name (`reference_mask`):", "", table,
            ""]


def data_markdown(summary: dict, rows: list[dict]) -> str:
    """The section's markdown from data_summary.json and qc.tsv's rows."""
    flagged = [r for r in rows if r["flags"] not in ("", "n/a")]
    policy = {"warn": "flagged images train all the same", "exclude": "flagged images are left out before the split",
              "fail": "a flagged image stops the run"}[summary["policy"]]
    lines = ["## Data", "", f"Input QC policy `data.qc.policy: {summary['policy']}`: {policy}.", "",
             _counts_table(summary), "", "What was left out or is missing:", "", *_reasons(summary), "",
             f"Input QC of the {len(rows)} images on the grid (every value: `results/qc/qc.tsv`):", "",
             _distributions(rows), "", *_reference_table(rows)]
    if flagged:
        lines += ["Flagged:", "", md_table(["image", "dataset", "decision", "flags"],
                                           [[Path(r["path"]).name, r["dataset"], r["decision"], r["flags"]]
                                            for r in flagged[:20]])]
        lines += [f"(and {len(flagged) - 20} more)"] if len(flagged) > 20 else []
        lines.append("")
    lines += ["![the worst-scoring images, template brain outlined](qc-worst.png)", ""]
    return "\n".join(lines)


def data_section(summary_path: Path, qc_path: Path, mosaic: Path, out: Path) -> str:
    """The section's markdown; the qc rule's mosaic copied beside the report as qc-worst.png."""
    with atomic_path(out / "qc-worst.png") as tmp:
        shutil.copyfile(mosaic, tmp)
    return data_markdown(json.loads(Path(summary_path).read_text()), read_tsv(qc_path))
