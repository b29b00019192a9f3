"""The conditioning section (condition_check's conditioning.json): does the requested condition show?"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainddpm.evaluation.report.common import fmt, md_table, pyplot, save_figure


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
             "", md_table(["covariate", "score", "real validation", "synthetic (requested vs predicted)"],
                           [[n, kinds[n], _score_text(doc["real_validation"].get(n)),
                             _score_text(doc["synthetic"].get(n))] for n in names]), ""]
    rows = []
    for st in doc["strata"]:
        rows.append([st["stratum"], str(st["n"])] + [_score_text(st["scores"].get(n)) for n in names] +
                    [fmt(st["ventricle_fraction"]), f"{st['mmd']:.4f} (vs {st['n_real_matching']} real)"
                     if "mmd" in st else ("–" if "n_real_matching" not in st else "no matching real volume")])
    lines += ["Per stratum:", "", md_table(["stratum", "n"] + [f"{n} {kinds[n]}" for n in names] +
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

    plt = pyplot()
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
    save_figure(fig, png, dpi=80)


def conditioning_section(conditioning_files: dict[str, Path], sample_parts: dict[str, list[Path]], out: Path) -> str:
    """The whole section, one sub-section and strata-<sampler>.png per sampler."""
    first = json.loads(Path(next(iter(conditioning_files.values()))).read_text())
    section = ["## Conditioning: does the requested condition show?", "", first["definitions"], ""]
    for sampler, path in conditioning_files.items():
        section += conditioning_markdown(sampler, json.loads(Path(path).read_text()))
        plot_strata(sample_parts[sampler], out / f"strata-{sampler}.png")
        section += [f"![synthetic volumes per stratum, {sampler}](strata-{sampler}.png)", ""]
    return "\n".join(section)
