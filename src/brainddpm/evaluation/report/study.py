"""The study section: the metrics laid out like the reference study's table, the real-halves verdict, the
intervals, slices, memorization and training figures, and another run's figures beside this run's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from brainddpm.evaluation.report.common import fmt, md_table, pyplot, save_figure
from brainddpm.fileio import atomic_path

# (column, metric for the model row, metric for the real-images row); the study's table.
STUDY_COLUMNS = (("MMD", "mmd_monai_generative", None), ("FID", "fid", None),
                 ("MS-SSIM", "msssim_synthetic", "msssim_real"))
STUDY_VALUES = "reference study: MMD 0.036 [0.028-0.045], FID 19.39 [16.8-22.5], MS-SSIM 0.58 [0.51-0.64] " \
               "(synthetic) vs 0.74 [0.68-0.79] (real), 86 vs 86 volumes at 84x128x84"


def study_table(metrics_by_sampler: dict[str, dict]) -> list[list[str]]:
    """Rows: one per sampler, then 'real images'; columns as in the reference study's Table 2."""
    rows = []
    for sampler, doc in metrics_by_sampler.items():
        m = doc["metrics"]
        rows.append([f"DDPM model ({sampler})"] + [fmt(m.get(model_key), 2 if name == "FID" else 3)
                                                   for name, model_key, _ in STUDY_COLUMNS])
    first = next(iter(metrics_by_sampler.values()))["metrics"]
    rows.append(["real images"] + [fmt(first.get(real_key)) if real_key else "–" for _, _, real_key in STUDY_COLUMNS])
    return rows


def floor_verdict(sampler: str, metrics: dict) -> str:
    """One sentence: is the synthetic set within the real-halves floor (do the two MMD 95% intervals overlap)?"""
    model, floor = metrics.get("mmd_monai_generative"), metrics.get("floor_mmd_monai_generative")
    if not model or not floor or model.get("value") is None or floor.get("value") is None:
        return f"- **{sampler}**: the MMD or its real-halves floor was not computed, so no verdict."
    overlap = model["ci_low"] <= floor["ci_high"] and floor["ci_low"] <= model["ci_high"]
    where = (f"its MMD {fmt(model, 4)} overlaps the MMD of two halves of the real set {fmt(floor, 4)}" if overlap
             else f"its MMD {fmt(model, 4)} lies {'above' if model['ci_low'] > floor['ci_high'] else 'below'} the "
                  f"MMD of two halves of the real set {fmt(floor, 4)}, 95% intervals apart")
    verdict = "within" if overlap else "**not** within"
    return f"- **{sampler}**: the synthetic set is {verdict} the real-halves floor: {where}."


def diversity_sentence(metrics: dict) -> str | None:
    """The verdict's clause on diversity: synthetic MS-SSIM against the real set's 95% interval (higher MS-SSIM
    within a set: its volumes are more alike)."""
    synthetic, real = metrics.get("msssim_synthetic"), metrics.get("msssim_real")
    if not synthetic or not real or synthetic.get("value") is None or real.get("value") is None:
        return None
    if synthetic["ci_low"] > real["ci_high"]:
        return f"**less diverse than real**: MS-SSIM {fmt(synthetic)} within the set against {fmt(real)} for real"
    if synthetic["ci_high"] < real["ci_low"]:
        return f"more varied than real: MS-SSIM {fmt(synthetic)} within the set against {fmt(real)} for real"
    return f"as diverse as real: MS-SSIM {fmt(synthetic)} against {fmt(real)}"


def sampler_verdict(sampler: str, metrics: dict, realism: dict | None) -> str:
    """Every measure the run has, weighed: the MMD floor, the realism probes and diversity, one clause each."""
    from brainddpm.evaluation.report.realism import realism_sentence

    lines = [floor_verdict(sampler, metrics)]
    if realism is not None:
        lines.append(f"  It is {realism_sentence(realism)}.")
    diversity = diversity_sentence(metrics)
    if diversity:
        lines.append(f"  It is {diversity}.")
    return "\n".join(lines)


def write_metrics_files(metrics_by_sampler: dict, memo: dict, out: Path, shape: tuple[int, ...] | None = None) -> None:
    header = ["", "MMD (95% CI)", "FID (95% CI)", "MS-SSIM (95% CI)"]
    with atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sampler", "metric", "value", "ci_low", "ci_high", "n_real", "n_synthetic", "definition"])
        for sampler, doc in metrics_by_sampler.items():
            for name, e in doc["metrics"].items():
                w.writerow([sampler, name, e["value"], e["ci_low"], e["ci_high"], e["n_real"], e["n_synthetic"],
                            e["definition"]])
    payload = {"samplers": metrics_by_sampler, "memorization": memo,
               "table": [header, *study_table(metrics_by_sampler)], **({"shape": list(shape)} if shape else {})}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def plot_ci(metrics_by_sampler: dict, png: Path) -> None:
    """Point estimates and 95% intervals, per metric, for each sampler and the real-halves floor."""
    plt = pyplot()
    names = [n for n in next(iter(metrics_by_sampler.values()))["metrics"] if not n.startswith("floor_")]
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels, xs = [], 0
        for sampler, doc in metrics_by_sampler.items():
            for key, label in ((name, sampler), (f"floor_{name}", "real halves")):
                e = doc["metrics"].get(key)
                if e is None or label in labels:
                    continue
                ax.errorbar([xs], [e["value"]], yerr=[[e["value"] - e["ci_low"]], [e["ci_high"] - e["value"]]],
                            fmt="o", capsize=3, color="tab:gray" if label == "real halves" else None)
                labels.append(label)
                xs += 1
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_title(name.replace("_", " "), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, png, dpi=100)


def plot_slices(real: np.ndarray, syn_by_sampler: dict[str, np.ndarray], png: Path, k: int = 3) -> None:
    """k real and k synthetic volumes per sampler, axial/coronal/sagittal mid-slices."""
    plt = pyplot()
    groups = [("real", real[:k])] + [(f"synthetic ({s})", v[:k]) for s, v in syn_by_sampler.items()]
    fig, axes = plt.subplots(3, sum(len(v) for _, v in groups), figsize=(1.6 * k * len(groups), 5), squeeze=False)
    col = 0
    for label, vols in groups:
        for j, vol in enumerate(vols):
            vol = vol[0]
            cx, cy, cz = (s // 2 for s in vol.shape)
            for r, sl in enumerate((vol[:, :, cz], vol[:, cy, :], vol[cx, :, :])):
                axes[r, col].imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
                axes[r, col].set_axis_off()
            axes[0, col].set_title(label if j == 0 else "", fontsize=8, loc="left")
            col += 1
    save_figure(fig, png, dpi=90)


def plot_memorization(memo: dict, syn: np.ndarray, train: np.ndarray, png: Path, pairs: int = 3) -> None:
    """Histogram of nearest-training correlations (synthetic vs validation) and the closest pairs."""
    plt = pyplot()
    fig = plt.figure(figsize=(9, 3 + 1.6 * pairs))
    ax = fig.add_subplot(pairs + 1, 1, 1)
    ax.hist(memo["validation_max_corr"], bins=20, alpha=0.6, label="real validation vs training")
    ax.hist(memo["synthetic_max_corr"], bins=20, alpha=0.6, label="synthetic vs training")
    ax.axvline(memo["threshold"], color="k", ls="--", label=f"{memo['percentile']:g}th pct of validation")
    ax.set_xlabel("max Pearson correlation with any training volume (brain mask)")
    ax.legend(fontsize=7)
    for p, (s, t) in enumerate(memo["closest_pairs"][:pairs]):
        for j, (vol, name) in enumerate(((syn[s][0], f"synthetic #{s}"), (train[t][0], f"nearest training #{t}"))):
            a = fig.add_subplot(pairs + 1, 2, 2 * (p + 1) + j + 1)
            a.imshow(np.rot90(vol[:, :, vol.shape[2] // 2]), cmap="gray", vmin=0, vmax=1)
            a.set_axis_off()
            a.set_title(f"{name} (r={memo['closest_corr'][p]:.3f})" if j == 0 else name, fontsize=7)
    save_figure(fig, png, dpi=90)


def study_markdown(metrics_by_sampler: dict, memo: dict, train_info: dict, table: str,
                   realism: dict[str, dict] | None = None) -> str:
    any_doc = next(iter(metrics_by_sampler.values()))
    n_real, n_syn = len(any_doc["ids"]["real"]), len(any_doc["ids"]["synthetic"])
    lines = [
        "# brain-ddpm report", "",
        f"{n_real} real validation volumes vs {n_syn} synthetic volumes per sampler; 95% percentile intervals "
        f"from {next(iter(any_doc['metrics'].values()))['n_boot']} bootstrap resamples "
        "(real and synthetic resampled independently). Definitions: docs/metrics.md.", "",
        "## Verdict", "",
        *[sampler_verdict(s, d["metrics"], (realism or {}).get(s)) for s, d in metrics_by_sampler.items()], "",
        "## Metrics (laid out like the reference study)", "", table, "",
        f"For comparison, the {STUDY_VALUES}. MMD here is the MONAI GenerativeModels definition "
        "(the one comparable with the study); MS-SSIM is the mean over pairs within a set, on whole volumes.", "",
    ]
    if not any_doc.get("fid_computed"):
        lines += [f"**FID was not computed**: {any_doc.get('fid_note')}. To enable it, run "
                  "`snakemake fetch_fid_weights` where the internet is reachable (a login node), or set "
                  "`evaluate.fid.weights` to a local MedicalNet ResNet file. FID is never computed from "
                  "untrained weights.", ""]
    else:
        lines += [f"FID caveat: {any_doc['fid_caveat']}", ""]
    lines += ["## All metrics", "", md_table(
        ["sampler", "metric", "value [95% CI]", "definition"],
        [[s, n, fmt(e, 4), e["definition"]] for s, d in metrics_by_sampler.items() for n, e in d["metrics"].items()]),
        "", "The `floor_*` rows compare two disjoint halves of the real set: what 'as good as real' looks like at "
        "this N. MS-SSIM restricted to the brain bounding box (`*_bbox`) removes the inflation by the shared zero "
        "background.", "", "![confidence intervals](ci.png)", "",
        "## Training", "", "![loss](loss.png)", "",
        md_table(["epochs", "steps", "final loss", "wall time (h)", "GPU-hours", "world size", "device"],
                  [[str(train_info.get(k, "–")) for k in ("epochs", "steps")] +
                   [f"{train_info.get('final_loss', float('nan')):.5f}",
                    f"{train_info.get('wall_time_s', 0) / 3600:.2f}",
                    f"{train_info.get('gpu_hours', 0):.2f}", str(train_info.get("world_size")),
                    str(train_info.get("device"))]]), "",
        *base_lines(train_info),
        "## Real vs synthetic", "", "![slices](slices.png)", "",
        "## Memorization check", "",
        f"Each synthetic volume's maximum Pearson correlation (inside the training brain mask) with any of "
        f"{len(memo['train_indices'])} training volumes, against the same statistic for the real validation "
        f"volumes. Threshold: the {memo['percentile']:g}th percentile of the validation set = "
        f"{memo['threshold']:.4f}. Flagged synthetic volumes: {len(memo['flagged'])} of "
        f"{len(memo['synthetic_max_corr'])}" + (f" ({', '.join(memo['synthetic_ids'][i] for i in memo['flagged'])})"
                                                 if memo["flagged"] else "") + ".", "",
        "![memorization](memorization.png)", "",
    ]
    return "\n".join(lines)


def base_lines(train_info: dict) -> list[str]:
    """A fine-tuning run's base (train.json), named in the training section; nothing for a run from scratch."""
    base = train_info.get("base")
    if not base:
        return []
    frozen = train_info.get("frozen") or {}
    kept = (f"; kept fixed: {', '.join(frozen['prefixes'])} ({frozen['parameters']:,} parameters)"
            if frozen.get("prefixes") else "; every parameter trained")
    return [f"**Fine-tuned** from the base model {base['run'] or base['path']} (`{base['path']}`, step "
            f"{base['step']}, sha256 `{base['sha256'][:16]}…`){kept}.", ""]


def comparison_markdown(metrics_by_sampler: dict, shape: tuple[int, ...], other_path: Path) -> str:
    """This run's headline figures beside another run's (e.g. the pixel demo's), each at its own resolution."""
    other_path = Path(other_path)
    header = ["run", "shape", "MMD (95% CI)", "real-halves floor", "MS-SSIM synthetic", "MS-SSIM real"]
    if not other_path.is_file():
        return "\n".join(["## Compared with another run", "", f"{other_path} does not exist (yet): run that "
                           "pipeline (e.g. `make demo`) and rerun the report to see its figures here.", ""])
    other = json.loads(other_path.read_text())

    def rows(label: str, by_sampler: dict, grid) -> list[list[str]]:
        size = "x".join(map(str, grid)) if grid else "–"
        return [[f"{label} ({s})", size] + [fmt(d["metrics"].get(k), 4) for k in (
            "mmd_monai_generative", "floor_mmd_monai_generative", "msssim_synthetic", "msssim_real")]
            for s, d in by_sampler.items()]

    table = md_table(header, rows("this run", metrics_by_sampler, shape) +
                      rows(str(other_path), other["samplers"], other.get("shape")))
    return "\n".join(["## Compared with another run", "", "Each run is measured at its own resolution, against "
                       "its own validation volumes: the floor column says what 'as good as real' is at each.", "",
                       table, ""])
