"""The utility section (the utility stage's utility.json): the arms' downstream metrics with paired
differences against real only, the two-sample test, the memorization figures, a verdict and utility.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainddpm.evaluation.report.common import md_table, pyplot, save_figure

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
    lines += [md_table(header, rows), "",
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
                  md_table(["sampler", f"balanced accuracy [{level} CI]", "held out", "steps"], rows), ""]
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
    plt = pyplot()
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
    save_figure(fig, png, dpi=90)


def utility_section(utility: Path, memo: dict, out: Path) -> str:
    """The section from utility.json, with utility.png."""
    doc = json.loads(Path(utility).read_text())
    plot_utility(doc, out / "utility.png")
    return utility_markdown(doc, memo)
