"""The utility protocol: one arm for one repeat (a part), then every part gathered into metrics with CIs.

A part trains the downstream models of one arm with the seed of one repeat and stores their predictions
on the test set (the validation split), never a score: scoring waits for the gather step, which draws
one set of bootstrap resamples of the test *subjects* (a subject's sessions stay together) and uses it
for every arm, model and repeat. So each arm's CI and its paired difference against real only come from
the same resamples, and the repeats are averaged inside each resample (the metric of an arm is the mean
over repeats of the per-repeat metric). All arms of one repeat share its seed: the same initial weights
and batch order, so that the paired difference is about the data. Every setting is fixed by the config;
nothing is chosen by looking at the test split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainddpm.errors import BadInputError, ConfigError
from brainddpm.evaluation.bootstrap import subject_resamples
from brainddpm.utility.arms import arm_names, build_arm, needs_synthetic
from brainddpm.utility.downstream import MODELS
from brainddpm.utility.labels import fit_target, read_labelled, read_split

log = logging.getLogger(__name__)

METRICS = {True: ("balanced_accuracy", "auroc"), False: ("mae", "pearson_r")}


def repeat_seed(settings: dict, repeat: int) -> int:
    """The seed of one repeat, the same for every arm."""
    return int(np.random.SeedSequence([settings["seed"], repeat]).generate_state(1)[0])


def sample_files_info(parts) -> dict:
    """Which synthetic volumes an arm used: the files, sampler and checkpoint (read from the parts)."""
    import h5py

    from brainddpm.data.shards import read_meta

    info = {"files": [str(p) for p in parts], "samplers": [], "checkpoints": [], "checkpoint_steps": []}
    for p in parts:
        with h5py.File(p, "r") as f:
            sampler, step = f.attrs.get("sampler"), f.attrs.get("checkpoint_step")
        meta = read_meta(p)
        for key, value in (("samplers", sampler), ("checkpoints", meta[0].get("source_path") if meta else None),
                           ("checkpoint_steps", step)):
            if value is not None and str(value) not in info[key]:
                info[key].append(str(value))
    return info


def run_part(settings: dict, train_dir, val_dir, samples, arm: str, repeat: int) -> dict:
    """Train the downstream models of `arm` with the seed of `repeat`; their predictions on the test set.

    The training data is the real training split (and synthetic volumes of `samples`); the test set is
    the validation split. The target's encoding is fitted on the real training split alone."""
    target = settings["target"]
    real = read_split(train_dir, target)
    test = read_split(val_dir, target)
    encoding = fit_target(target, settings["target_type"], real.values, train_dir)
    leaked = sorted(set(real.subjects) & set(test.subjects))
    if leaked:
        raise BadInputError(val_dir, f"test subjects {leaked[:5]} are also in the training split {train_dir}")
    arms = arm_names(settings["ratios"], encoding.categorical)
    if arm not in arms:
        raise ConfigError(f"utility arm {arm!r} is not one of this study's arms {arms}")
    synthetic_images = synthetic_labels = None
    if needs_synthetic(arm):
        if not samples:
            raise BadInputError("--samples", f"utility arm '{arm}' needs sample part files")
        synthetic = read_labelled(samples, target, samples[0])
        leaked = sorted(set(synthetic.subjects) & set(test.subjects))
        if leaked:
            raise BadInputError(samples[0], f"synthetic volumes named after test subjects {leaked[:5]}")
        synthetic_images, synthetic_labels = synthetic.images, encoding.encode(synthetic.values, samples[0])
    seed = repeat_seed(settings, repeat)
    trainset = build_arm(arm, real.images, encoding.encode(real.values, train_dir), synthetic_images,
                         synthetic_labels, seed, settings["augment_ratio"], samples[0] if samples else "--samples")
    encoding.encode(test.values, val_dir)  # a test class that the training split lacks is an error
    classes = len(encoding.classes) if encoding.categorical else 0
    predictions = {}
    for model in settings["models"]:
        log.info("utility %s, repeat %d, %s: %d training volumes %s", arm, repeat, model, trainset.n, trainset.counts)
        out = MODELS[model](trainset.images, trainset.labels, test.images, encoding.categorical, classes,
                            settings[model], seed)
        predictions[model] = encoding.decode(np.asarray(out, dtype=np.float64)).tolist()
    return {
        "arm": arm, "repeat": repeat, "seed": seed, "target": target,
        "kind": "categorical" if encoding.categorical else "continuous", "classes": encoding.classes,
        "n": trainset.n, "counts": trainset.counts, "steps": settings["cnn"]["steps"],
        "train": {"split": str(train_dir), "subjects": len(set(real.subjects)), "volumes": len(real.subjects)},
        "synthetic": sample_files_info(samples) if needs_synthetic(arm) else None,
        "test": {"split": str(val_dir), "subjects": test.subjects,
                 "truth": test.values if encoding.categorical else [float(v) for v in test.values]},
        "predictions": predictions,
    }


# ---- scores ----

def balanced_accuracy(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the classes present in `truth` of the fraction predicted right (argmax)."""
    predicted = probabilities.argmax(1)
    return float(np.mean([(predicted[truth == c] == c).mean() for c in np.unique(truth)]))


def auroc(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (one class against the rest, averaged over the classes present; binary:
    the usual AUROC of class 1), by the rank-sum formula; NaN with one class present."""
    from scipy.stats import rankdata

    present = np.unique(truth)
    if len(present) < 2:
        return float("nan")
    columns = [1] if probabilities.shape[1] == 2 else present
    areas = []
    for c in columns:
        positive = truth == c
        ranks = rankdata(probabilities[:, c])
        n_pos, n_neg = positive.sum(), (~positive).sum()
        areas.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(areas))


def mae(values: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(values - truth).mean())


def pearson_r(values: np.ndarray, truth: np.ndarray) -> float:
    if values.std() == 0 or truth.std() == 0:
        return float("nan")
    return float(np.corrcoef(values, truth)[0, 1])


SCORES = {"balanced_accuracy": balanced_accuracy, "auroc": auroc, "mae": mae, "pearson_r": pearson_r}


def interval(values, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


# ---- gather ----

def gather(parts: list[dict], settings: dict, where="parts") -> dict:
    """Metrics of every arm and model with subject-level bootstrap CIs, and paired differences vs real only."""
    if not parts:
        raise BadInputError(where, "no utility parts to gather")
    first = parts[0]
    for p in parts[1:]:
        if (p["test"]["subjects"], p["test"]["truth"], p["target"]) != \
                (first["test"]["subjects"], first["test"]["truth"], first["target"]):
            raise BadInputError(where, f"part of arm {p['arm']!r}, repeat {p['repeat']} has another test set or "
                                       "target than the others: every arm must be scored on the same test set")
    by_arm = {}
    for p in parts:
        if p["repeat"] in by_arm.setdefault(p["arm"], {}):
            raise BadInputError(where, f"two parts for arm {p['arm']!r}, repeat {p['repeat']}")
        by_arm[p["arm"]][p["repeat"]] = p
    if "real" not in by_arm:
        raise BadInputError(where, "no part of the arm 'real': nothing to compare the other arms with")
    repeats = sorted(by_arm["real"])
    for arm, runs in by_arm.items():
        if sorted(runs) != repeats:
            raise BadInputError(where, f"arm {arm!r} has repeats {sorted(runs)}, arm 'real' has {repeats}")
    steps = {p["steps"] for p in parts}
    if len(steps) > 1:
        raise BadInputError(where, f"the parts trained for different numbers of steps {sorted(steps)}")
    categorical = first["kind"] == "categorical"
    truth = np.array([first["classes"].index(v) for v in first["test"]["truth"]] if categorical
                     else first["test"]["truth"])
    resamples = subject_resamples(first["test"]["subjects"], settings["bootstrap"], settings["seed"])
    models = list(first["predictions"])
    metrics = METRICS[categorical]

    def table(arm, model, metric):
        """Per-repeat point values, and the repeat-mean metric of every bootstrap resample."""
        score = SCORES[metric]
        predictions = [np.asarray(by_arm[arm][r]["predictions"][model]) for r in repeats]
        point = [score(pr, truth) for pr in predictions]
        boot = np.array([np.mean([score(pr[idx], truth[idx]) for pr in predictions]) for idx in resamples])
        return point, boot

    cache = {(a, m, k): table(a, m, k) for a in by_arm for m in models for k in metrics}
    arms = {}
    for arm in sorted(by_arm, key=lambda a: (a != "real", a)):
        p = by_arm[arm][repeats[0]]
        entry = {"n": p["n"], "counts": p["counts"], "repeats": len(repeats), "synthetic": p["synthetic"],
                 "models": {}}
        for model in models:
            entry["models"][model] = {}
            for metric in metrics:
                point, boot = cache[(arm, model, metric)]
                result = {"value": float(np.mean(point)), "ci": interval(boot, settings["confidence"]),
                          "per_repeat": point}
                if arm != "real":
                    base_point, base_boot = cache[("real", model, metric)]
                    result["difference"] = {"value": float(np.mean(point) - np.mean(base_point)),
                                            "ci": interval(boot - base_boot, settings["confidence"])}
                entry["models"][model][metric] = result
        arms[arm] = entry
    return {
        "target": first["target"], "kind": first["kind"], "classes": first["classes"], "metrics": list(metrics),
        "higher_is_better": {m: m != "mae" for m in metrics},
        "test": {"split": first["test"]["split"], "volumes": len(truth),
                 "subjects": len(set(first["test"]["subjects"]))},
        "steps": steps.pop(), "repeats": len(repeats), "bootstrap": settings["bootstrap"],
        "confidence": settings["confidence"], "arms": arms,
    }


def read_parts(paths) -> list[dict]:
    import json

    parts = []
    for path in map(Path, paths):
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise BadInputError(path, f"not a readable utility part ({exc})") from None
    return parts
