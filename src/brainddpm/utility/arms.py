"""The training sets of the arms: what the downstream model learns from, arm by arm.

Every arm starts from arrays (real training volumes and their labels, synthetic volumes and theirs) and
draws with one seeded generator, so an arm is the same set for the same seed. The arms differ only in
their training data: the optimizer steps and the test set are the protocol's, the same for all.

    real             the real training split
    synthetic        synthetic volumes only, as many as real ones
    mix-<ratio>      real plus ratio x as many synthetic volumes (ratios from utility.ratios)
    augmented        real plus classical augmentation (MONAI random affine, flip, bias field, noise) of
                     randomly drawn real volumes, as many as utility.augment_ratio x real: the control
                     that asks whether synthetic volumes do more than cheap perturbations
    oversampled      real with the minority class(es) repeated until every class is as large as the
                     largest (categorical targets only): the control for class balance alone
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from brainddpm.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """Images (N, 1, D, H, W), labels (N,), and how many volumes of each origin the set holds."""

    images: np.ndarray
    labels: np.ndarray
    counts: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)


def arm_names(ratios, categorical: bool) -> list[str]:
    """The arms of a study, real only first (every other arm is compared with it)."""
    names = ["real", "synthetic"] + [f"mix-{float(r):g}" for r in ratios] + ["augmented"]
    return names + (["oversampled"] if categorical else [])


def needs_synthetic(arm: str) -> bool:
    return arm == "synthetic" or arm.startswith("mix-")


def build_arm(arm: str, real_images, real_labels, synthetic_images, synthetic_labels, seed: int,
              augment_ratio: float = 1.0, where="sample parts") -> TrainingSet:
    """The training set of one arm; `where` names the synthetic input in errors."""
    rng = np.random.default_rng(seed)
    n_real = len(real_labels)
    if arm == "real":
        return TrainingSet(real_images, real_labels, {"real": n_real})
    if arm == "synthetic":
        pick = _draw_synthetic(synthetic_labels, n_real, rng, where, arm)
        return TrainingSet(synthetic_images[pick], synthetic_labels[pick], {"synthetic": n_real})
    if arm.startswith("mix-"):
        ratio = _ratio(arm)
        count = round(ratio * n_real)
        pick = _draw_synthetic(synthetic_labels, count, rng, where, arm)
        return TrainingSet(np.concatenate([real_images, synthetic_images[pick]]),
                           np.concatenate([real_labels, synthetic_labels[pick]]), {"real": n_real, "synthetic": count})
    if arm == "augmented":
        count = round(augment_ratio * n_real)
        pick = rng.integers(0, n_real, size=count)
        extra = augment(real_images[pick], int(rng.integers(2**31)))
        return TrainingSet(np.concatenate([real_images, extra]), np.concatenate([real_labels, real_labels[pick]]),
                           {"real": n_real, "augmented": count})
    if arm == "oversampled":
        if real_labels.dtype.kind not in "iu":
            raise ConfigError("utility arm 'oversampled' needs a categorical target")
        pick = oversample_minority(real_labels, rng)
        return TrainingSet(real_images[pick], real_labels[pick], {"real": n_real, "oversampled": len(pick) - n_real})
    raise ConfigError(f"utility arm {arm!r} is none of real, synthetic, mix-<ratio>, augmented, oversampled")


def _ratio(arm: str) -> float:
    try:
        ratio = float(arm.removeprefix("mix-"))
    except ValueError:
        raise ConfigError(f"utility arm {arm!r}: 'mix-' must be followed by a ratio, e.g. mix-0.5") from None
    if ratio <= 0:
        raise ConfigError(f"utility arm {arm!r}: the ratio must be positive")
    return ratio


def _draw_synthetic(labels, count: int, rng, where, arm: str) -> np.ndarray:
    """`count` distinct synthetic volumes, drawn at random (never one twice: a repeat is no new data)."""
    if labels is None or len(labels) == 0:
        raise BadInputError(where, f"utility arm '{arm}' needs synthetic volumes with the target; none given")
    if count > len(labels):
        raise BadInputError(where, f"utility arm '{arm}' needs {count} synthetic volumes, the parts hold "
                                   f"{len(labels)} with the target: sample more, or lower utility.ratios")
    return np.sort(rng.choice(len(labels), size=count, replace=False))


def oversample_minority(labels: np.ndarray, rng) -> np.ndarray:
    """Indices of every volume once, plus repeats of the smaller classes until each is as large as the largest."""
    classes, sizes = np.unique(labels, return_counts=True)
    extra = [rng.choice(np.flatnonzero(labels == c), size=sizes.max() - s, replace=True)
             for c, s in zip(classes, sizes)]
    return np.concatenate([np.arange(len(labels)), *extra]).astype(np.int64)


def augment(images: np.ndarray, seed: int) -> np.ndarray:
    """Classical augmentation of (N, 1, D, H, W) volumes with MONAI: a small random affine (rotation up to
    ~6 degrees, 5 % scaling, 1 voxel shift), a left-right flip, a smooth bias field and Gaussian noise."""
    from monai.transforms import Compose, RandAffine, RandBiasField, RandFlip, RandGaussianNoise

    transform = Compose([
        RandAffine(prob=1.0, rotate_range=(0.1, 0.1, 0.1), scale_range=(0.05, 0.05, 0.05),
                   translate_range=(1, 1, 1), padding_mode="zeros"),
        RandFlip(prob=0.5, spatial_axis=0),  # axis 0 of the RAS grid is left-right
        RandBiasField(prob=0.5, coeff_range=(0.0, 0.1)),
        RandGaussianNoise(prob=0.5, std=0.02),
    ])
    transform.set_random_state(seed=seed)
    out = [np.asarray(transform(volume), dtype=np.float32) for volume in images]
    return np.clip(np.stack(out), 0.0, 1.0) if out else images[:0]
