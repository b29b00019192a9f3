"""The realism probe: can a simple classifier tell synthetic volumes from real ones, and by what?

MMD compares mean images and FID summary features; a set can sit inside their real-halves floor and still
give itself away volume by volume. Four linear probes, each on one view of the volumes, answer "what gives
them away?" (held-out real validation volumes against the synthetic ones of one sampler):

- (a) `whole`: every voxel of the volume as shipped;
- (b) `brain`: the voxels inside the core brain only (voxels inside at least `core_fraction` of the real
  volumes' brains), the same mask for both sets, so the background says nothing;
- (c) `histogram`: the `bins`-bin intensity histogram inside the core brain (contrast, not anatomy);
- (d) `texture`: the volume minus a Gaussian-smoothed copy (sigma `smooth_sigma` voxels) inside the core
  brain: fine texture and grain, not shape;
- and, for samples whose background was masked (sample.background: mask), `whole_unmasked`: (a) on the
  volumes as the network made them, so the report can say what the masking removed.

Each probe is scikit-learn's standardisation, PCA (voxel views, at most `components`) and a class-balanced
logistic regression, scored by `folds`-fold cross-validation grouped by subject (all sessions of a real
subject on one side). Its balanced accuracy is 0.5 when the sets cannot be told apart and 1.0 when every
volume gives itself away; the CI bootstraps the real subjects and the synthetic volumes, each within itself.

The evidence map is the whole-volume probe's gradient times input: for a linear probe, each voxel's share
of the logit (weight times the volume's difference from the mean), averaged over synthetic volumes;
positive voxels push towards "synthetic". Written as NIfTI and drawn over the mean real brain.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np

from brainddpm.data.nifti import save_volume
from brainddpm.data.shards import read_raw_volumes, read_volumes
from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

log = logging.getLogger(__name__)

PROBES = {"whole": "the whole volume", "brain": "the brain only (background removed)",
          "histogram": "the intensity histogram inside the brain", "texture": "fine texture inside the brain",
          "whole_unmasked": "the whole volume before the background was masked"}
TOLD_APART = 0.75  # a probe that reaches this balanced accuracy, with its CI above chance, tells the sets apart


def core_brain(real: np.ndarray, fraction: float) -> np.ndarray:
    """Voxels inside the brain (non-zero) of at least `fraction` of the real volumes (N, D, H, W)."""
    return (real > 0).mean(axis=0) >= fraction


def views(volumes: np.ndarray, core: np.ndarray, settings: dict) -> dict[str, np.ndarray]:
    """The feature matrix of each probe (module docstring) for volumes (N, D, H, W)."""
    from scipy import ndimage

    flat = volumes.reshape(len(volumes), -1)
    inside = volumes[:, core]
    edges = np.linspace(0.0, 1.0, int(settings["bins"]) + 1)
    histograms = np.stack([np.histogram(v, bins=edges)[0] / max(len(v), 1) for v in inside])
    sigma = float(settings["smooth_sigma"])
    texture = np.stack([(v - ndimage.gaussian_filter(v, sigma))[core] for v in volumes])
    return {"whole": flat, "brain": inside, "histogram": histograms, "texture": texture}


def _pipeline(n_features: int, n_train: int, components: int, seed: int):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if n_features > components:
        steps.append(PCA(n_components=min(components, n_train - 1), random_state=seed))
    return make_pipeline(*steps, LogisticRegression(class_weight="balanced", max_iter=2000))


def balanced_accuracy(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the two classes' recall at the 0.5 threshold."""
    predicted = scores >= 0.5
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in (0, 1)]))


def out_of_fold(features: np.ndarray, truth: np.ndarray, groups: list[str], settings: dict, seed: int) -> np.ndarray:
    """Each volume's probability of "synthetic" from a probe that did not see its subject."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = min(int(settings["folds"]), int(np.sum(truth == 0)), int(np.sum(truth == 1)))
    if folds < 2:
        raise BadInputError("realism probe", f"needs at least two real subjects and two synthetic volumes, got "
                            f"{int(np.sum(truth == 0))} and {int(np.sum(truth == 1))}")
    scores = np.zeros(len(truth))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(features, truth, groups):
        probe = _pipeline(features.shape[1], len(train), int(settings["components"]), seed)
        probe.fit(features[train], truth[train])
        scores[test] = probe.predict_proba(features[test])[:, 1]
    return scores


def accuracy_interval(scores: np.ndarray, truth: np.ndarray, groups: list[str], n_boot: int, confidence: float,
                      seed: int) -> list[float]:
    """Percentile CI of the balanced accuracy over resamples of the real subjects and the synthetic volumes."""
    rng = np.random.default_rng([seed, 7])
    units = {g: np.flatnonzero(np.asarray(groups) == g) for g in dict.fromkeys(groups)}
    real_units = [u for u, idx in units.items() if truth[idx[0]] == 0]
    synthetic = np.flatnonzero(truth == 1)
    draws = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(real_units), len(real_units))
        idx = np.concatenate([*(units[real_units[i]] for i in chosen), rng.choice(synthetic, len(synthetic))])
        draws.append(balanced_accuracy(scores[idx], truth[idx]))
    tail = 100 * (1 - confidence) / 2
    return [round(float(v), 4) for v in np.percentile(draws, [tail, 100 - tail])]


def evidence_map(whole: np.ndarray, truth: np.ndarray, shape: tuple, components: int, seed: int) -> np.ndarray:
    """The whole-volume probe's gradient times input, averaged over synthetic volumes (module docstring)."""
    probe = _pipeline(whole.shape[1], len(truth), components, seed).fit(whole, truth)
    scaler, *middle, regression = probe.steps
    weights = regression[1].coef_[0]
    if middle:
        weights = middle[0][1].components_.T @ weights
    weights = weights / np.where(scaler[1].scale_ > 0, scaler[1].scale_, 1.0)
    share = (whole[truth == 1] - scaler[1].mean_) * weights
    return share.mean(axis=0).reshape(shape).astype(np.float32)


def verdict(probes: dict) -> str:
    """The sentence that names what gives the synthetic volumes away, from the probes' accuracies and CIs."""
    told = {k for k, p in probes.items() if p["accuracy"] >= TOLD_APART and p["ci"][0] > 0.5}
    if not told:
        return "no probe tells them from real volumes"
    tells = []
    if "whole_unmasked" in told and "whole" not in told:
        tells.append("the background, which the mask removes")
    if "whole" in told and "brain" not in told:
        tells.append("what lies outside the core brain (the background, the brain's edge), not the core anatomy")
    if "histogram" in told:
        tells.append("the intensity histogram")
    if "texture" in told:
        tells.append("fine texture")
    if "brain" in told and not {"histogram", "texture"} & told:
        tells.append("the brain's shape and contrast")
    return "what gives them away: " + "; ".join(tells or ["the whole volume"])


def probe_sets(real: np.ndarray, real_meta: list[dict], synthetic: np.ndarray, raw: np.ndarray | None,
               settings: dict, n_boot: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every probe's accuracy and CI, the evidence map and the core brain, for real and synthetic (N, D, H, W)."""
    core = core_brain(real, float(settings["core_fraction"]))
    if not core.any():
        raise BadInputError("realism probe", "no voxel is inside the brain of the real volumes at core_fraction "
                            f"{settings['core_fraction']}: lower evaluate.realism.core_fraction")
    truth = np.r_[np.zeros(len(real), int), np.ones(len(synthetic), int)]
    groups = [m["subject"] for m in real_meta] + [f"synthetic-{i}" for i in range(len(synthetic))]
    real_views, synthetic_views = views(real, core, settings), views(synthetic, core, settings)
    features = {k: np.concatenate([real_views[k], synthetic_views[k]]) for k in real_views}
    if raw is not None:
        features["whole_unmasked"] = np.concatenate([real_views["whole"], raw.reshape(len(raw), -1)])
    probes = {}
    for name, matrix in features.items():
        scores = out_of_fold(matrix, truth, groups, settings, seed)
        probes[name] = {"what": PROBES[name], "accuracy": round(balanced_accuracy(scores, truth), 4),
                        "ci": accuracy_interval(scores, truth, groups, n_boot, 0.95, seed), "features": matrix.shape[1]}
        log.info("realism probe %s (%s): balanced accuracy %.3f [%.3f, %.3f]", name, PROBES[name],
                 probes[name]["accuracy"], *probes[name]["ci"])
    evidence = evidence_map(features["whole"], truth, real.shape[1:], int(settings["components"]), seed)
    return probes, evidence, core


def evidence_figure(mean_real: np.ndarray, evidence: np.ndarray, png: Path, title: str) -> None:
    """Mid slices of the mean real brain with the evidence map over them (red: towards synthetic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(np.abs(evidence).max()) or 1.0
    centre = [s // 2 for s in mean_real.shape]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, take in zip(axes, (lambda v: v[:, :, centre[2]], lambda v: v[:, centre[1], :],
                               lambda v: v[centre[0], :, :])):
        ax.imshow(np.rot90(take(mean_real)), cmap="gray", vmin=0, vmax=1)
        outside = (take(mean_real) <= 0) & (take(evidence) == 0)  # nothing to show: the plain background
        shown = ax.imshow(np.rot90(np.ma.masked_where(outside, take(evidence))), cmap="RdBu_r", vmin=-limit,
                          vmax=limit, alpha=0.6)
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes, shrink=0.8, label="share of the logit (red: synthetic)")
    fig.suptitle(textwrap.fill(title, 90), fontsize=7)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def run_realism_probe(settings: dict, n: int, n_boot: int, seed: int, val_dir: Path, parts: list[Path],
                      out: Path, png: Path, nifti: Path) -> dict:
    """The probes for one sampler's parts against the validation split: realism.json, the evidence figure and
    its NIfTI."""
    from brainddpm.evaluation.evaluate import select_real

    real, real_meta = select_real(val_dir, n, seed)  # the volumes the metrics compare
    synthetic, synthetic_meta, affine = read_volumes(parts)
    order = np.argsort([m["subject"] for m in synthetic_meta], kind="stable")[:n]
    raw = read_raw_volumes(parts)  # None for parts sampled with sample.background: keep
    raw = None if raw is None else raw[order][:, 0]
    masked = raw is not None
    probes, evidence, core = probe_sets(real[:, 0], real_meta, synthetic[order][:, 0], raw, settings, n_boot, seed)
    outside = ~(real[:, 0] > 0).any(axis=0)  # outside every real brain: exactly 0 in real volumes
    result = {"probes": probes, "verdict": verdict(probes), "told_apart_at": TOLD_APART,
              "real_volumes": len(real), "synthetic_volumes": len(order), "core_brain_voxels": int(core.sum()),
              "background_masked": masked, "settings": settings,
              "background_level": {"real": round(float(real[:, 0][:, outside].mean()), 5),
                                   "synthetic": round(float(synthetic[order][:, 0][:, outside].mean()), 5),
                                   **({"synthetic_unmasked": round(float(raw[:, outside].mean()), 5)}
                                      if raw is not None else {})}}
    save_volume(evidence, affine, nifti)
    evidence_figure(real[:, 0].mean(axis=0), evidence, png, f"where the whole-volume probe sees synthetic "
                    f"(balanced accuracy {probes['whole']['accuracy']:.2f}); {result['verdict']}")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return result
