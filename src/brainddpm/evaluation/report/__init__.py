"""The report folder, results/report/: report.md and report.html, metrics.{md,csv,json} and the figures.

One module per section, in the order the page reads: `study` (the metrics laid out like the reference
study's table, the real-halves verdict, intervals, training, slices, memorization; another run's figures
beside this run's), `conditioning` (does the requested condition show?), `latent` (the autoencoder's
reconstruction), `utility` (does the synthetic data help?), `realism` (what tells synthetic volumes from real
ones), and `page` (the synthetic NIfTI files, the HTML page). `common` holds what they share. Each section
reads only the JSON its stage wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.evaluation.report.common import md_table
from brainddpm.evaluation.report.conditioning import conditioning_section
from brainddpm.evaluation.report.data import data_section
from brainddpm.evaluation.report.latent import reconstruction_section
from brainddpm.evaluation.report.page import grid_markdown, part_grid, write_html
from brainddpm.evaluation.report.realism import realism_section
from brainddpm.evaluation.report.study import (
    comparison_markdown,
    plot_ci,
    plot_memorization,
    plot_slices,
    study_markdown,
    study_table,
    write_metrics_files,
)
from brainddpm.evaluation.report.utility import utility_section
from brainddpm.fileio import atomic_path

__all__ = ["write_report"]


def write_report(metric_files: dict[str, Path], memo_path: Path, train_dir: Path, val_dir: Path,
                 sample_parts: dict[str, list[Path]], run_dir: Path, out: Path,
                 conditioning_files: dict[str, Path] | None = None, reconstruction: Path | None = None,
                 compare: Path | None = None, utility: Path | None = None, qc_dir: Path | None = None,
                 realism_files: dict[str, Path] | None = None) -> Path:
    """Assemble results/report/: report.md, metrics.{md,csv,json}, loss.png, slices.png, ci.png, memorization.png,
    for a conditional model strata-<sampler>.png, for a latent model reconstruction.png (from `reconstruction`,
    its figure copied beside it); `compare`: another run's metrics.json, tabulated beside this run's;
    `utility`: utility.json of the utility stage, a "Utility" section and utility.png; `qc_dir`: the qc rule's
    folder, a "Data" section and qc-worst.png; `realism_files`: realism.json per sampler, a "Realism" section,
    evidence-<sampler>.png, and the verdict weighs them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_by_sampler = {s: json.loads(Path(p).read_text()) for s, p in metric_files.items()}
    memo = json.loads(Path(memo_path).read_text())
    first_part = Path(next(iter(sample_parts.values()))[0])
    affine, shape = part_grid(first_part)
    realism = {s: json.loads(Path(p).read_text()) for s, p in (realism_files or {}).items()}
    text = _study(metrics_by_sampler, memo, train_dir, val_dir, sample_parts, Path(run_dir), out, shape, realism)
    if realism_files:
        text += "\n" + realism_section(realism_files, out)
    if qc_dir is not None:
        qc_dir = Path(qc_dir)
        text += "\n" + data_section(qc_dir / "data_summary.json", qc_dir / "qc.tsv", qc_dir / "worst.png", out)
    if conditioning_files:
        text += "\n" + conditioning_section(conditioning_files, sample_parts, out)
    if reconstruction is not None:
        text += "\n" + reconstruction_section(reconstruction, out)
    if utility is not None:
        text += "\n" + utility_section(utility, memo, out)
    if compare is not None:
        text += "\n" + comparison_markdown(metrics_by_sampler, shape, compare)
    text += "\n" + grid_markdown(affine, shape, folder=f"{first_part.parent.parent}/<sampler>/nifti-*/")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    write_html(text, out, out / "report.html")
    return out / "report.md"


def _study(metrics_by_sampler: dict, memo: dict, train_dir: Path, val_dir: Path, sample_parts: dict[str, list[Path]],
           run_dir: Path, out: Path, shape: tuple[int, ...], realism: dict[str, dict]) -> str:
    """The study section's files and figures; its markdown."""
    from brainddpm.evaluation.evaluate import select_synthetic

    with atomic_path(out / "loss.png") as tmp:
        shutil.copyfile(run_dir / "loss.png", tmp)
    write_metrics_files(metrics_by_sampler, memo, out, shape)
    plot_ci(metrics_by_sampler, out / "ci.png")
    real, _, _ = read_volumes(split_files(val_dir))
    synthetic = {s: select_synthetic(parts, 10**9)[0] for s, parts in sample_parts.items()}
    plot_slices(real, synthetic, out / "slices.png")
    train, _, _ = read_volumes(split_files(train_dir))
    plot_memorization(memo, next(iter(synthetic.values())), train, out / "memorization.png")
    table = md_table(["", "MMD (95% CI)", "FID (95% CI)", "MS-SSIM (95% CI)"], study_table(metrics_by_sampler))
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(table + "\n")
    train_info = json.loads((run_dir / "train.json").read_text())
    return study_markdown(metrics_by_sampler, memo, train_info, table, realism)
