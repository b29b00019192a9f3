"""The report: metrics table laid out like the reference study's, loss curve, real-vs-synthetic
slices, confidence-interval plot and memorization summary (markdown, CSV, JSON and PNG); with the utility
stage, a "Utility" section (utility.json: downstream metrics per arm, the two-sample test) and utility.png."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.fileio import atomic_path

# (column, metric for the model row, metric for the real-images row); the study's table.
STUDY_COLUMNS = (("MMD", "mmd_monai_generative", None), ("FID", "fid", None),
                 ("MS-SSIM", "msssim_synthetic", "msssim_real"))
STUDY_VALUES = "reference study: MMD 0.036 [0.028-0.045], FID 19.39 [16.8-22.5], MS-SSIM 0.58 [0.51-0.64] " \
               "(synthetic) vs 0.74 [0.68-0.79] (real), 86 vs 86 volumes at 84x128x84"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(entry: dict | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "–"
    return f"{entry['value']:.{digits}f} [{entry['ci_low']:.{digits}f}–{entry['ci_high']:.{digits}f}]"


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


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


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
    plt = _plt()
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
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_slices(real: np.ndarray, syn_by_sampler: dict[str, np.ndarray], png: Path, k: int = 3) -> None:
    """k real and k synthetic volumes per sampler, axial/coronal/sagittal mid-slices."""
    plt = _plt()
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
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_memorization(memo: dict, syn: np.ndarray, train: np.ndarray, png: Path, pairs: int = 3) -> None:
    """Histogram of nearest-training correlations (synthetic vs validation) and the closest pairs."""
    plt = _plt()
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
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _score_text(e: dict | None) -> str:
    if not e:
        return "–"
    text = fmt(e, 3 if e["kind"] == "accuracy" else 2)
    return text + (f" (majority {e['majority_rate']:.2f})" if e["kind"] == "accuracy" else "")


def conditioning_markdown(sampler: str, doc: dict) -> list[str]:
    """The report's section for one sampler's conditioning.json: does the requested condition show?"""
    names = [c["name"] for c in doc["encoding"]["covariates"]]
    kinds = {c["name"]: ("MAE" if c["type"] == "continuous" else "accuracy") for c in doc["encoding"]["covariates"]}
    lines = [f"### {sampler}", "",
             f"Predictors fitted on {doc['n_train']} real training volumes; {doc['n_val']} real validation volumes "
             f"(how readable each covariate is at all) and {doc['n_synthetic']} synthetic volumes scored against "
             f"the covariates they were asked for; {doc['level']:.0%} bootstrap CIs ({doc['bootstrap']} resamples).",
             "", _md_table(["covariate", "score", "real validation", "synthetic (requested vs predicted)"],
                           [[n, kinds[n], _score_text(doc["real_validation"].get(n)),
                             _score_text(doc["synthetic"].get(n))] for n in names]), ""]
    rows = []
    for st in doc["strata"]:
        rows.append([st["stratum"], str(st["n"])] + [_score_text(st["scores"].get(n)) for n in names] +
                    [fmt(st["ventricle_fraction"]), f"{st['mmd']:.4f} (vs {st['n_real_matching']} real)"
                     if "mmd" in st else ("–" if "n_real_matching" not in st else "no matching real volume")])
    lines += ["Per stratum:", "", _md_table(["stratum", "n"] + [f"{n} {kinds[n]}" for n in names] +
                                            ["ventricle fraction", "MMD to matching real"], rows), ""]
    for name, eff in doc["ventricle_effect"].items():
        real = doc["real_ventricle_effect"].get(name, {}).get("slope_per_unit")
        lines.append(f"- Ventricle fraction against requested {name}: slope {fmt(eff['slope_per_unit'], 5)} per "
                     f"unit (real training volumes: {fmt(real, 5)}).")
        if "difference" in eff:
            d = eff["difference"]
            verdict = ("the CI excludes zero: the requested " + name + " shows" if d["excludes_zero"]
                       else "the CI includes zero: no clear effect at this N")
            lines.append(f"- **{d['high_stratum']}** minus **{d['low_stratum']}**: ventricle fraction "
                         f"{fmt(d, 4)} ({d['n_high']} vs {d['n_low']} volumes); {verdict}.")
    return lines + [""]


def plot_strata(parts: list[Path], png: Path, per_stratum: int = 4) -> None:
    """Mid-slices of a few synthetic volumes per stratum, one row per stratum."""
    from brainddpm.evaluation.evaluate import select_synthetic

    plt = _plt()
    vols, meta = select_synthetic(parts, 10**9)
    strata = list(dict.fromkeys(m.get("stratum", "") for m in meta))
    fig, axes = plt.subplots(len(strata), per_stratum * 2, figsize=(2.0 * per_stratum * 2, 2.2 * len(strata)),
                             squeeze=False)
    for row, stratum in zip(axes, strata):
        idx = [i for i, m in enumerate(meta) if m.get("stratum", "") == stratum][:per_stratum]
        for k, ax in enumerate(row):
            ax.set_axis_off()
            if k // 2 < len(idx):
                v = vols[idx[k // 2], 0]
                sl = v[:, :, v.shape[2] // 2] if k % 2 == 0 else v[v.shape[0] // 2]
                ax.imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(stratum, fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def write_report(metric_files: dict[str, Path], memo_path: Path, train_dir: Path, val_dir: Path,
                 sample_parts: dict[str, list[Path]], run_dir: Path, out: Path,
                 conditioning_files: dict[str, Path] | None = None, reconstruction: Path | None = None,
                 compare: Path | None = None, utility: Path | None = None) -> Path:
    """Assemble results/report/: report.md, metrics.{md,csv,json}, loss.png, slices.png, ci.png, memorization.png,
    for a conditional model strata-<sampler>.png, for a latent model reconstruction.png (from `reconstruction`,
    its figure copied beside it); `compare`: another run's metrics.json, tabulated beside this run's;
    `utility`: utility.json of the utility stage, a "Utility" section and utility.png."""
    from brainddpm.evaluation.evaluate import select_synthetic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_by_sampler = {s: json.loads(Path(p).read_text()) for s, p in metric_files.items()}
    memo = json.loads(Path(memo_path).read_text())
    train_info = json.loads((Path(run_dir) / "train.json").read_text())
    with atomic_path(out / "loss.png") as tmp:
        shutil.copyfile(Path(run_dir) / "loss.png", tmp)
    first_part = Path(next(iter(sample_parts.values()))[0])
    write_metrics_files(metrics_by_sampler, memo, out, _part_grid(first_part)[1])
    plot_ci(metrics_by_sampler, out / "ci.png")
    real, _, _ = read_volumes(split_files(val_dir))
    syn = {s: select_synthetic(parts, 10**9)[0] for s, parts in sample_parts.items()}
    plot_slices(real, syn, out / "slices.png")
    first = next(iter(sample_parts))
    train, _, _ = read_volumes(split_files(train_dir))
    plot_memorization(memo, select_synthetic(sample_parts[first], 10**9)[0], train, out / "memorization.png")
    table = _md_table(["", "MMD (95% CI)", "FID (95% CI)", "MS-SSIM (95% CI)"], study_table(metrics_by_sampler))
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(table + "\n")
    text = _report_markdown(metrics_by_sampler, memo, train_info, table)
    if conditioning_files:
        section = ["## Conditioning: does the requested condition show?", "",
                   json.loads(Path(next(iter(conditioning_files.values()))).read_text())["definitions"], ""]
        for sampler, path in conditioning_files.items():
            section += conditioning_markdown(sampler, json.loads(Path(path).read_text()))
            plot_strata(sample_parts[sampler], out / f"strata-{sampler}.png")
            section += [f"![synthetic volumes per stratum, {sampler}](strata-{sampler}.png)", ""]
        text = text + "\n" + "\n".join(section)
    if reconstruction is not None:
        text = text + "\n" + reconstruction_markdown(json.loads(Path(reconstruction).read_text()))
        figure = Path(reconstruction).with_suffix(".png")
        if figure.is_file():
            with atomic_path(out / "reconstruction.png") as tmp:
                shutil.copyfile(figure, tmp)
    if utility is not None:
        doc = json.loads(Path(utility).read_text())
        plot_utility(doc, out / "utility.png")
        text = text + "\n" + utility_markdown(doc, memo)
    if compare is not None:
        text = text + "\n" + comparison_markdown(metrics_by_sampler, _part_grid(first_part)[1], compare)
    text = text + "\n" + grid_markdown(*_part_grid(first_part), folder=f"{first_part.parent.parent}/<sampler>/nifti-*/")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    write_html(text, out, out / "report.html")
    return out / "report.md"


def reconstruction_markdown(doc: dict) -> str:
    """The autoencoder's section: how well it reconstructs unseen volumes, the latent model's ceiling."""
    m = doc["metrics"]
    roi = doc["decode"].get("roi")
    decode = f"windows of {'x'.join(map(str, roi))} latent voxels, Gaussian blending" if roi else "whole volume"
    rows = [[name.upper(), fmt(m[name], 2 if name == "psnr" else 4), doc["definitions"][name]]
            for name in ("psnr", "ssim", "mae")]
    return "\n".join([
        "## Reconstruction (autoencoder of the latent model)", "",
        f"Each of the {doc['n']} validation volumes ({doc['n_subjects']} subjects) encoded and decoded exactly as a "
        f"sampled latent is decoded ({decode}; "
        f"latent scale factor {doc['scale_factor']:.4f}); 95% intervals from resampling subjects. Synthetic volumes "
        "cannot be more faithful than this: it bounds what the latent diffusion model can reach.", "",
        _md_table(["metric", "mean [95% CI]", "definition"], rows), "",
        "![validation volumes and their reconstructions](reconstruction.png)", ""])


# ---- utility (the utility stage's utility.json) ----

METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC", "mae": "MAE", "pearson_r": "Pearson r"}


def _ci_text(value, ci, digits: int = 3, sign: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    low, high = ci if ci else (float("nan"), float("nan"))
    bounds = f" [{f.format(low)}, {f.format(high)}]" if np.isfinite(low) and np.isfinite(high) else ""
    return f.format(value) + bounds


def _better(doc: dict, metric: str, ci) -> int:
    """+1 when the whole CI of a difference lies on the better side of 0, -1 on the worse side, else 0."""
    if not ci or not all(np.isfinite(ci)):
        return 0
    up = doc["higher_is_better"][metric]
    if ci[0] > 0:
        return 1 if up else -1
    if ci[1] < 0:
        return -1 if up else 1
    return 0


def utility_verdict(doc: dict) -> str:
    """One sentence on the headline metric: did real plus synthetic volumes beat real only (paired CIs)?"""
    metric = doc["metrics"][0]
    name, level = METRIC_NAMES.get(metric, metric), f"{doc['confidence']:.0%}"
    mixes = [a for a in doc["arms"] if a.startswith("mix-")] or [a for a in doc["arms"] if a == "synthetic"]
    rows = [(arm, model, doc["arms"][arm]["models"][model][metric]["difference"])
            for arm in mixes for model in doc["arms"][arm]["models"]]
    if not rows:
        return "No arm used synthetic volumes, so there is no verdict on them."
    up = 1 if doc["higher_is_better"][metric] else -1

    def gain(row):
        value = row[2]["value"]
        return up * value if value is not None and np.isfinite(value) else -np.inf

    def say(row):
        return f"{row[0]} with the {row[1]} model: {_ci_text(row[2]['value'], row[2]['ci'], sign=True)}"

    better = [r for r in rows if _better(doc, metric, r[2]["ci"]) > 0]
    worse = [r for r in rows if _better(doc, metric, r[2]["ci"]) < 0]
    if better and not worse:
        return (f"Real plus synthetic volumes **beat** real only on {name} in {len(better)} of {len(rows)} "
                f"arm-model pairs, with {level} CIs of the paired difference clear of zero (best: "
                f"{say(max(better, key=gain))}).")
    if worse and not better:
        return (f"Real plus synthetic volumes did **worse** than real only on {name} in {len(worse)} of {len(rows)} "
                f"arm-model pairs, with {level} CIs of the paired difference clear of zero (worst: "
                f"{say(min(worse, key=gain))}).")
    if better and worse:
        return (f"**Mixed**: real plus synthetic volumes beat real only on {name} in {len(better)} and did worse in "
                f"{len(worse)} of {len(rows)} arm-model pairs ({level} CIs clear of zero; "
                f"best {say(max(better, key=gain))}, "
                f"worst {say(min(worse, key=gain))}).")
    return (f"Adding synthetic volumes made **no measurable difference** to {name}: the {level} CI of every paired "
            f"difference against real only includes zero ({len(rows)} arm-model pairs; largest gain "
            f"{say(max(rows, key=gain))}), on a test set of {doc['test']['volumes']} volumes.")


def utility_markdown(doc: dict, memo: dict | None = None) -> str:
    """The report's "Utility" section: which synthetic volumes, the arms' metrics with CIs and paired differences
    against real only, the two-sample test, the memorization figures and a verdict."""
    level = f"{doc['confidence']:.0%}"
    gen = doc.get("generator") or {}
    steps = ", ".join(map(str, gen.get("checkpoint_steps") or [])) or "–"
    samplers = ", ".join(gen.get("samplers") or []) or "–"
    used = (f"Synthetic volumes: run **{gen.get('run') or '–'}**, sampler **{samplers}**, "
            f"checkpoint `{', '.join(gen.get('checkpoints') or []) or '–'}` (step {steps}), "
            f"{len(gen.get('files') or [])} part files; each synthetic volume's label is the {doc['target']} it was "
            "asked for." if gen else "")
    classes = f" ({', '.join(doc['classes'])})" if doc.get("classes") else ""
    lines = ["## Utility: does the synthetic data help?", "", utility_verdict(doc), "",
             f"Downstream task: predict **{doc['target']}**{classes}, {doc['kind']}, from the volumes. Test set: the "
             f"validation split ({doc['test']['volumes']} volumes of {doc['test']['subjects']} subjects), which "
             "neither "
             f"the generator nor the downstream models saw and which no setting was tuned on. Every arm trains for "
             f"the same {doc['steps']} CNN steps; {doc['repeats']} repeats (seeds, shared by the arms); {level} CIs "
             f"from {doc['bootstrap']} subject-level bootstrap resamples of the test set, the same resamples for "
             "every arm, so each difference against real only is paired.", ""]
    if used:
        lines += [used, ""]
    metrics = doc["metrics"]
    header = ["arm", "model", "n (training volumes)"]
    for m in metrics:
        header += [f"{METRIC_NAMES.get(m, m)} [{level} CI]", "vs real only [CI]"]
    rows = []
    for arm, entry in doc["arms"].items():
        n = f"{entry['n']} (" + " + ".join(f"{v} {k}" for k, v in entry["counts"].items()) + ")"
        for model, scores in entry["models"].items():
            row = [arm, model, n]
            for m in metrics:
                e = scores[m]
                row.append(_ci_text(e["value"], e["ci"]))
                d = e.get("difference")
                row.append(_ci_text(d["value"], d["ci"], sign=True) if d else "(reference)")
            rows.append(row)
    lines += [_md_table(header, rows), "",
              "Arms: `real` the training split alone; `synthetic` as many synthetic volumes as real ones, no real; "
              "`mix-<r>` real plus r x as many synthetic; `augmented` real plus classical augmentation (random affine, "
              "flip, bias field, noise) of as many volumes as utility.augment_ratio says; `oversampled` real with the "
              "minority class repeated. A difference is the arm's metric minus real only's"
              + (" (for MAE lower is better)." if "mae" in metrics else "."), "",
              "![utility metric per arm and against the synthetic ratio](utility.png)", ""]
    two = doc.get("two_sample") or {}
    if two:
        rows = [[s, _ci_text(t["accuracy"], t["ci"]), f"{t['held_out']['real_volumes']} real "
                 f"({t['held_out']['real_subjects']} subjects) + {t['held_out']['synthetic_volumes']} synthetic",
                 str(t["steps"])] for s, t in two.items()]
        lines += ["**Realism probe: classifier two-sample test.** A CNN learns real (validation split) against "
                  "synthetic volumes and is scored on held-out subjects and volumes: balanced accuracy 0.5 means it "
                  "cannot tell them apart, 1.0 that every volume gives itself away.", "",
                  _md_table(["sampler", f"balanced accuracy [{level} CI]", "held out", "steps"], rows), ""]
    if memo:
        flagged = len(memo["flagged"])
        lines += [f"**Memorization check** (the evaluation's, on the first sampler's volumes): {flagged} of "
                  f"{len(memo['synthetic_max_corr'])} synthetic volumes are more correlated with a training volume "
                  f"than the {memo['percentile']:g}th percentile of the validation volumes ({memo['threshold']:.4f}); "
                  f"highest synthetic correlation {max(memo['synthetic_max_corr']):.4f}, highest validation "
                  f"{max(memo['validation_max_corr']):.4f}. "
                  + ("Synthetic volumes that copy training volumes would make the mix arms a form of oversampling."
                     if flagged else "No synthetic volume stands out as a copy of a training volume."), ""]
    return "\n".join(lines)


def plot_utility(doc: dict, png: Path) -> None:
    """Per metric: the metric of each arm with its CI (one marker per model), and the metric against the
    synthetic ratio (0: real only, r: mix-r), real only's CI shaded."""
    plt = _plt()
    metrics, arms = doc["metrics"], list(doc["arms"])
    models = list(next(iter(doc["arms"].values()))["models"])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        for k, model in enumerate(models):
            shift = (k - (len(models) - 1) / 2) * 0.15
            values = [doc["arms"][a]["models"][model][metric] for a in arms]
            ys = [e["value"] for e in values]
            err = [[max(0.0, e["value"] - e["ci"][0]) if np.isfinite(e["ci"][0]) else 0 for e in values],
                   [max(0.0, e["ci"][1] - e["value"]) if np.isfinite(e["ci"][1]) else 0 for e in values]]
            row[0].errorbar(np.arange(len(arms)) + shift, ys, yerr=err, fmt="o", capsize=3, label=model)
            mixes = sorted((float(a.removeprefix("mix-")), a) for a in arms if a.startswith("mix-"))
            points = [(0.0, "real")] + mixes
            e = [doc["arms"][a]["models"][model][metric] for _, a in points]
            line = row[1].errorbar([x + shift * 0.1 for x, _ in points], [v["value"] for v in e],
                                   yerr=[[max(0.0, v["value"] - v["ci"][0]) for v in e],
                                         [max(0.0, v["ci"][1] - v["value"]) for v in e]],
                                   fmt="o-", capsize=3, label=model)
            real = doc["arms"]["real"]["models"][model][metric]["ci"]
            if all(np.isfinite(real)):
                row[1].axhspan(real[0], real[1], alpha=0.1, color=line[0].get_color())
        row[0].set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        name = METRIC_NAMES.get(metric, metric)
        row[0].set_ylabel(name)
        row[0].set_title(f"{name} per arm ({doc['confidence']:.0%} CI)", fontsize=9)
        row[1].set_xlabel("synthetic : real ratio (0 = real only)")
        row[1].set_title(f"{name} against the synthetic ratio (band: real only's CI)", fontsize=9)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


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

    table = _md_table(header, rows("this run", metrics_by_sampler, shape) +
                      rows(str(other_path), other["samplers"], other.get("shape")))
    return "\n".join(["## Compared with another run", "", "Each run is measured at its own resolution, against "
                       "its own validation volumes: the floor column says what 'as good as real' is at each.", "",
                       table, ""])


def _part_grid(part: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    with h5py.File(part, "r") as f:
        return f["affine"][()], tuple(int(s) for s in f["images"].shape[-3:])


def grid_markdown(affine: np.ndarray, shape: tuple[int, ...],
                  folder: str = "results/samples/<run>/<sampler>/nifti-*/") -> str:
    """What the synthetic NIfTI are: the model's grid, its voxel size, and how to look at them."""
    voxel = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    size = "x".join(f"{v:.2f}" for v in voxel)
    return "\n".join([
        "## The synthetic NIfTI files", "",
        f"Each synthetic volume is written at the model's shape, {'x'.join(map(str, shape))} voxels of "
        f"**{size} mm**, covering the field of view of the MNI 1 mm grid the inputs were resampled to (RAS, "
        f"qform and sform code 4, MNI152): `{folder}`. FSLeyes and ITK-SNAP "
        "open them as they are and overlay them on the MNI152 template in world coordinates (`fsleyes "
        "$FSLDIR/data/standard/MNI152_T1_1mm.nii.gz synthetic-0000_ddpm.nii.gz`). Tools that expect the 1 mm "
        "grid itself get a copy resampled onto it (trilinear) with `brainddpm to-mni --config <your configs> "
        "--out <folder> <files>`. Intensities are in [0, 1] (0: background).", ""])


def write_html(markdown_text: str, folder: Path, path: Path) -> None:
    """report.md as one self-contained HTML page (the figures inlined), for `snakemake --report` and e-mail."""
    import base64
    import re

    import markdown

    def inline(match: re.Match) -> str:
        image = folder / match.group(2)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, markdown_text),
                             extensions=["tables"])
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>brain-ddpm report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
            "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .5em}"
            "img{max-width:100%}code{background:#f3f3f3}</style></head><body>" + body + "</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def _report_markdown(metrics_by_sampler: dict, memo: dict, train_info: dict, table: str) -> str:
    any_doc = next(iter(metrics_by_sampler.values()))
    n_real, n_syn = len(any_doc["ids"]["real"]), len(any_doc["ids"]["synthetic"])
    lines = [
        "# brain-ddpm report", "",
        f"{n_real} real validation volumes vs {n_syn} synthetic volumes per sampler; 95% percentile intervals "
        f"from {next(iter(any_doc['metrics'].values()))['n_boot']} bootstrap resamples "
        "(real and synthetic resampled independently). Definitions: docs/metrics.md.", "",
        "## Verdict", "",
        *[floor_verdict(s, d["metrics"]) for s, d in metrics_by_sampler.items()], "",
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
    lines += ["## All metrics", "", _md_table(
        ["sampler", "metric", "value [95% CI]", "definition"],
        [[s, n, fmt(e, 4), e["definition"]] for s, d in metrics_by_sampler.items() for n, e in d["metrics"].items()]),
        "", "The `floor_*` rows compare two disjoint halves of the real set: what 'as good as real' looks like at "
        "this N. MS-SSIM restricted to the brain bounding box (`*_bbox`) removes the inflation by the shared zero "
        "background.", "", "![confidence intervals](ci.png)", "",
        "## Training", "", "![loss](loss.png)", "",
        _md_table(["epochs", "steps", "final loss", "wall time (h)", "GPU-hours", "world size", "device"],
                  [[str(train_info.get(k, "–")) for k in ("epochs", "steps")] +
                   [f"{train_info.get('final_loss', float('nan')):.5f}", f"{train_info.get('wall_time_s', 0) / 3600:.2f}",
                    f"{train_info.get('gpu_hours', 0):.2f}", str(train_info.get("world_size")),
                    str(train_info.get("device"))]]), "",
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
