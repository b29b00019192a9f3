"""Volumes with their downstream target: read from shards or sample parts, and encoded for training.

The target is a covariate stored with each volume (the `covariates` JSON of a shard; a conditional
generator's sample parts store the covariates each volume was asked for, which then is its label).
The encoding (classes, or mean and spread of a continuous target) is fitted on the real training split
only, so nothing about the test split shapes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Volumes:
    """Volumes (N, 1, D, H, W) in [0, 1], the raw target value of each, and who they come from."""

    images: np.ndarray
    values: list
    subjects: list[str]
    meta: list[dict]


def read_labelled(paths, target: str, where) -> Volumes:
    """The volumes of shard or part files that have a value for `target`; the others are left out (logged).

    `where` names the input in errors (a split folder, or the first part file)."""
    images, meta, _ = read_volumes(list(paths))
    values = [(m.get("covariates") or {}).get(target) for m in meta]
    keep = [i for i, v in enumerate(values) if v is not None]
    if not keep:
        raise BadInputError(where, f"no volume has the target covariate '{target}' (utility.target); the "
                                   "volumes must come from a run conditioned on it, or a conditional generator")
    if len(keep) < len(values):
        log.info("%s: %d of %d volumes have no '%s' and are left out", where, len(values) - len(keep), len(values),
                 target)
    return Volumes(images[keep], [values[i] for i in keep], [meta[i]["subject"] for i in keep],
                   [meta[i] for i in keep])


def read_split(split_dir, target: str) -> Volumes:
    """The labelled volumes of one split folder (index.json + shards)."""
    return read_labelled(split_files(split_dir), target, split_dir)


@dataclass
class Target:
    """How a target's raw values become training labels: class indices, or standardized numbers."""

    name: str
    categorical: bool
    classes: list[str] | None = None
    mean: float = 0.0
    scale: float = 1.0

    def encode(self, values: list, where) -> np.ndarray:
        """Labels of raw values: int64 class indices, or float32 (value - mean) / scale."""
        if not self.categorical:
            try:
                return ((np.asarray(values, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)
            except (TypeError, ValueError):
                raise BadInputError(where, f"continuous target '{self.name}' has values that are not numbers") \
                    from None
        unknown = sorted({str(v) for v in values} - set(self.classes))
        if unknown:
            raise BadInputError(where, f"target '{self.name}' has classes {unknown} that the training split lacks "
                                       f"(it has {self.classes})")
        return np.array([self.classes.index(str(v)) for v in values], dtype=np.int64)

    def decode(self, predictions: np.ndarray) -> np.ndarray:
        """Continuous predictions back in the target's units (categorical ones are probabilities already)."""
        return predictions if self.categorical else predictions * self.scale + self.mean


def fit_target(name: str, kind: str, values: list, where) -> Target:
    """The encoding of a target, fitted on the real training split's values.

    `kind`: categorical, continuous, or auto (categorical when any value is a string)."""
    if kind not in ("auto", "categorical", "continuous"):
        raise ConfigError(f"config key 'utility.target_type': {kind!r} is not auto, categorical or continuous")
    categorical = kind == "categorical" or (kind == "auto" and any(isinstance(v, str) for v in values))
    if categorical:
        classes = sorted({str(v) for v in values})
        if len(classes) < 2:
            raise BadInputError(where, f"categorical target '{name}' has one class ({classes[0]!r}) in the training "
                                       "split: nothing to tell apart")
        return Target(name, True, classes)
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError(where, f"continuous target '{name}' has values that are not numbers") from None
    return Target(name, False, mean=float(numbers.mean()), scale=float(numbers.std()) or 1.0)
