"""Does the condition show? Covariate predictors fitted on real training volumes, applied to synthetic ones.

For every covariate of a conditional model, a predictor is fitted on the real *training* split only
(scikit-learn: ridge regression with cross-validated strength for a continuous covariate such as age,
L2 logistic regression for a categorical one such as sex) on simple image features:

brain fraction (voxels above 0.05), mean brain intensity, and the *ventricle fraction*: the CSF-dark
share (intensity below 0.4 on the data stage's [0, 1] scale) of the central box (half the brain's extent
along each axis, centred on it), which the lateral ventricles dominate. Morphometrics only, on purpose:
a predictor on (pooled) voxel intensities was tried and read the demo's synthetic volumes, which are
a little darker and noisier than real ones, as thousands of years old (docs/metrics.md).

The predictors are then applied to the real validation split (how well the covariate can be read from
an image at all: the reference) and to the synthetic volumes, against the covariates each was asked for
(the sampling plan, stored with the volumes). Reported with percentile-bootstrap 95% CIs over volumes:
MAE for continuous covariates, accuracy (and the majority-class rate, what guessing gives) for
categorical ones (predicted ages are clipped to the training range), per stratum, and the effect on the
ventricle fraction: its slope against each requested
continuous covariate and, with strata, the difference between the strata asking for the highest and the
lowest value. On the demo cohort (ventricles that grow with age by construction) the difference
between age 80 and age 25 must be positive with a CI that excludes zero.

Why these are written here: the predictors are scikit-learn's; only the features and the bootstrap of
simple means over volumes (no duplicates, no pairs: unlike evaluation/bootstrap.py's) are ours.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

log = logging.getLogger(__name__)

CSF_THRESHOLD = 0.4  # CSF is dark on T1: below this on the [0, 1] scale (grey matter ~0.55, white ~0.8)
BRAIN_THRESHOLD = 0.05
LEVEL = 0.95


def ventricle_fraction(vol: np.ndarray) -> float:
    """CSF-dark share of the brain's central box (half its bounding box's extent along each axis)."""
    brain = np.argwhere(vol > BRAIN_THRESHOLD)
    if len(brain) == 0:
        return float("nan")
    lo, hi = brain.min(0), brain.max(0)
    centre, half = (lo + hi) / 2, (hi - lo) / 4
    box = tuple(slice(int(round(c - h)), int(round(c + h)) + 1) for c, h in zip(centre, half))
    return float((vol[box] < CSF_THRESHOLD).mean())


def features(vols: np.ndarray) -> np.ndarray:
    """Morphometrics [N, 3] of (N, [1,] D, H, W) volumes: brain fraction, mean brain intensity, ventricle fraction."""
    out = []
    for v in np.asarray(vols, dtype=np.float32).reshape(len(vols), *vols.shape[-3:]):
        brain = v > BRAIN_THRESHOLD
        out.append([brain.mean(), v[brain].mean() if brain.any() else 0.0, ventricle_fraction(v)])
    return np.nan_to_num(np.asarray(out, dtype=np.float64))


def fit_predictors(encoding: dict, design: np.ndarray, covariates: list[dict]) -> dict:
    """One fitted scikit-learn pipeline per covariate (standardised features), from the training volumes."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for c in encoding["covariates"]:
        rows = [i for i, r in enumerate(covariates) if r.get(c["name"]) is not None]
        y = [covariates[i][c["name"]] for i in rows]
        if c["type"] == "continuous":
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
            model.fit(design[rows], np.asarray(y, dtype=np.float64))
            model.value_range_ = (float(np.min(y)), float(np.max(y)))  # predictions are clipped to it
        elif len(set(map(str, y))) < 2:
            log.warning("covariate %s: one category in the training split; nothing to predict", c["name"])
            continue
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            model.fit(design[rows], [str(v) for v in y])
        out[c["name"]] = model
    return out


def _interval(value: float, draws, n: int) -> dict:
    """A point estimate with the percentile interval of its bootstrap `draws` (non-finite draws left out),
    under the keys of the metrics' intervals (bootstrap.gather)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) if len(draws) else (np.nan, np.nan)
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def _ci(rng: np.random.Generator, values: np.ndarray, n_boot: int) -> dict:
    """Mean of `values` with its bootstrap interval (volumes resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    draws = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_boot)]
    return _interval(values.mean(), draws, len(values))


def predict(model, design: np.ndarray) -> np.ndarray:
    """The predictor's output; a continuous one clipped to the training range (a volume unlike any training
    volume, e.g. noise, would otherwise get an age of thousands of years)."""
    pred = model.predict(design)
    return np.clip(pred, *model.value_range_) if hasattr(model, "value_range_") else pred


def _scores(encoding: dict, predictors: dict, design: np.ndarray, truth: list[dict], rng, n_boot: int) -> dict:
    """Per covariate: MAE (continuous) or accuracy (categorical) of the predictions against `truth`, with CIs."""
    out = {}
    for c in encoding["covariates"]:
        name = c["name"]
        rows = [i for i, r in enumerate(truth) if r.get(name) is not None]
        if name not in predictors or not rows:
            continue
        pred = predict(predictors[name], design[rows])
        if c["type"] == "continuous":
            want = np.asarray([truth[i][name] for i in rows], dtype=np.float64)
            out[name] = {"kind": "mae", **_ci(rng, np.abs(pred - want), n_boot),
                         "requested_mean": float(want.mean()), "predicted_mean": float(np.mean(pred))}
        else:
            want = [str(truth[i][name]) for i in rows]
            hits = np.asarray([p == w for p, w in zip(pred, want)], dtype=np.float64)
            majority = max(want.count(k) for k in set(want)) / len(want)
            out[name] = {"kind": "accuracy", **_ci(rng, hits, n_boot), "majority_rate": majority}
    return out


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum()) if (x * x).sum() > 0 else float("nan")


def _slope_ci(rng, x: np.ndarray, y: np.ndarray, n_boot: int) -> dict:
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        draws.append(_slope(x[idx], y[idx]))
    return _interval(_slope(x, y), draws, len(x))


def ventricle_effects(encoding: dict, ventricles: np.ndarray, requested: list[dict], strata: list[str], rng,
                      n_boot: int) -> dict:
    """Per continuous covariate: slope of the ventricle fraction on the requested value, and with strata
    the difference (highest-value stratum minus lowest-value stratum) of mean ventricle fraction."""
    out = {}
    for c in encoding["covariates"]:
        if c["type"] != "continuous":
            continue
        name = c["name"]
        rows = np.asarray([i for i, r in enumerate(requested) if r.get(name) is not None])
        if len(rows) < 3:
            continue
        x = np.asarray([requested[i][name] for i in rows], dtype=np.float64)
        entry = {"slope_per_unit": _slope_ci(rng, x, ventricles[rows], n_boot)}
        by_stratum = {}
        for i in rows:
            by_stratum.setdefault(strata[i], []).append(i)
        if len(by_stratum) >= 2 and "match_validation" not in by_stratum:
            means = {s: float(np.mean([requested[i][name] for i in idx])) for s, idx in by_stratum.items()}
            low, high = min(means, key=means.get), max(means, key=means.get)
            if means[low] < means[high]:
                a, b = ventricles[by_stratum[high]], ventricles[by_stratum[low]]
                draws = [a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean()
                         for _ in range(n_boot)]
                diff = _interval(a.mean() - b.mean(), draws, len(a) + len(b))
                entry["difference"] = {**diff, "high_stratum": high, "low_stratum": low, "high_value": means[high],
                                       "low_value": means[low], "n_high": len(a), "n_low": len(b),
                                       "excludes_zero": bool(diff["ci_low"] > 0 or diff["ci_high"] < 0)}
        out[name] = entry
    return out


def _matches(stratum_values: list[dict], real_cov: dict, encoding: dict, window: float) -> bool:
    """Whether a real volume falls in a stratum: categorical equal, continuous within the requested range
    (or within `window` standard deviations of the training split around a single requested value)."""
    for c in encoding["covariates"]:
        wanted = {r.get(c["name"]) for r in stratum_values}
        v = real_cov.get(c["name"])
        if c["type"] == "categorical":
            if len(wanted) == 1 and v != next(iter(wanted)):
                return False
        else:
            vals = [w for w in wanted if w is not None]
            if v is None or not vals:
                continue
            lo, hi = min(vals), max(vals)
            if lo == hi:
                lo, hi = lo - window * c["std"], hi + window * c["std"]
            if not lo <= v <= hi:
                return False
    return True


def stratum_table(encoding: dict, predictors: dict, design: np.ndarray, syn: np.ndarray, syn_meta: list[dict],
                  ventricles: np.ndarray, real: np.ndarray, real_meta: list[dict], rng, n_boot: int) -> list[dict]:
    """Per stratum: n, requested vs predicted covariates, ventricle fraction, and the MMD (MONAI
    GenerativeModels' definition, as in the metrics table) to the real validation volumes of that stratum."""
    from brainddpm.evaluation.metrics import gram_matrices, mmd_monai_generative

    rows = []
    strata = [m.get("stratum", "") for m in syn_meta]
    for stratum in dict.fromkeys(strata):
        idx = [i for i, s in enumerate(strata) if s == stratum]
        requested = [syn_meta[i]["covariates"] for i in idx]
        entry = {"stratum": stratum, "n": len(idx), "ventricle_fraction": _ci(rng, ventricles[idx], n_boot),
                 "scores": _scores(encoding, predictors, design[idx], requested, rng, n_boot)}
        if stratum != "match_validation":
            match = [j for j, m in enumerate(real_meta)
                     if _matches(requested, m.get("covariates", {}), encoding, window=0.5)]
            entry["n_real_matching"] = len(match)
            if len(match) >= 1:
                k = gram_matrices(real[match], syn[idx])
                entry["mmd"] = mmd_monai_generative(*k, int(np.prod(real.shape[1:])))
        rows.append(entry)
    return rows


def run_condition_check(n_boot: int, seed: int, train_dir: Path, val_dir: Path, parts: list[Path],
                        out: Path) -> dict:
    """Fit the predictors on the training split; score the validation split and the synthetic volumes."""
    from brainddpm.evaluation.evaluate import select_synthetic

    train, train_meta, _ = read_volumes(split_files(train_dir))
    real, real_meta, _ = read_volumes(split_files(val_dir))
    syn, syn_meta = select_synthetic(parts, 10**9)  # every synthetic volume, by sample index
    if any("covariates" not in m for m in syn_meta):
        raise BadInputError(parts[0], "synthetic volumes without requested covariates: not from a conditional model")
    encoding = _encoding_from_parts(parts)
    rng = np.random.default_rng([seed, 7])
    design = {name: features(vols) for name, vols in (("train", train), ("val", real), ("synthetic", syn))}
    train_cov = [m.get("covariates", {}) for m in train_meta]
    predictors = fit_predictors(encoding, design["train"], train_cov)
    real_cov = [m.get("covariates", {}) for m in real_meta]
    syn_cov = [m["covariates"] for m in syn_meta]
    ventricles = design["synthetic"][:, 2]
    predicted = {k: predict(p, design["synthetic"]) for k, p in predictors.items()}
    doc = {
        "definitions": __doc__.split("\n\n")[1].strip(),
        "n_train": len(train), "n_val": len(real), "n_synthetic": len(syn),
        "encoding": encoding, "bootstrap": n_boot, "level": LEVEL,
        "real_validation": _scores(encoding, predictors, design["val"], real_cov, rng, n_boot),
        "synthetic": _scores(encoding, predictors, design["synthetic"], syn_cov, rng, n_boot),
        "strata": stratum_table(encoding, predictors, design["synthetic"], syn, syn_meta, ventricles, real,
                                real_meta, rng, n_boot),
        "ventricle_effect": ventricle_effects(encoding, ventricles, syn_cov, [m.get("stratum", "") for m in syn_meta],
                                              rng, n_boot),
        "real_ventricle_effect": ventricle_effects(
            encoding, design["train"][:, 2], train_cov, ["train"] * len(train_cov), rng, n_boot),
        "volumes": [{"subject": m["subject"], "stratum": m.get("stratum"), "requested": m["covariates"],
                     "predicted": {k: _plain(v[i]) for k, v in predicted.items()},
                     "ventricle_fraction": float(ventricles[i])} for i, m in enumerate(syn_meta)],
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    for name, entry in doc["ventricle_effect"].items():
        if "difference" in entry:
            d = entry["difference"]
            log.info("ventricle fraction, %s %s minus %s: %.4f [%.4f, %.4f]", name, d["high_stratum"],
                     d["low_stratum"], d["value"], d["ci_low"], d["ci_high"])
    return doc


def _plain(v):
    return float(v) if isinstance(v, (np.floating, float, int)) else str(v)


def _encoding_from_parts(parts: list[Path]) -> dict:
    """The covariate encoding the synthetic volumes were sampled with (stored in each part's attributes)."""
    import h5py

    with h5py.File(parts[0], "r") as f:
        if "encoding" not in f.attrs:
            raise BadInputError(parts[0], "no covariate encoding stored: not sampled from a conditional model")
        return json.loads(f.attrs["encoding"])
