"""A classifier two-sample test: can a small 3D CNN tell real volumes from synthetic ones?

A realism probe beside MMD and FID, which compare summary statistics and can miss what each single
volume shows (grain, blur, a missing structure). The CNN learns real (0) against synthetic (1) on part
of the volumes and is scored on the rest: held-out real *subjects* (all sessions of a subject on one
side) and held-out synthetic volumes. Its balanced accuracy is 0.5 when the two sets cannot be told
apart and 1.0 when every volume gives itself away; the CI bootstraps the held-out real subjects and
synthetic volumes, each group within itself.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from brainddpm.errors import BadInputError
from brainddpm.utility.arms import oversample_minority
from brainddpm.utility.downstream import build_cnn, device, predict_network, train_network
from brainddpm.utility.protocol import balanced_accuracy, interval

log = logging.getLogger(__name__)


def _split_units(units: list[str], holdout: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Volume indices of the training and held-out side, split by unit (subject); both sides non-empty."""
    names = sorted(set(units))
    if len(names) < 2:
        raise BadInputError("two-sample", f"needs at least two subjects on each side, got {len(names)}")
    rng.shuffle(names)
    held = set(names[:min(len(names) - 1, max(1, round(holdout * len(names))))])
    is_held = np.array([u in held for u in units])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def two_sample_test(real_images: np.ndarray, real_subjects: list[str], synthetic_images: np.ndarray,
                    cnn: dict, holdout: float, bootstrap: int, confidence: float, seed: int) -> dict:
    """Train the CNN of `cnn` (channels, strides, steps, batch, lr) on real vs synthetic; score held-out units."""
    rng = np.random.default_rng(seed)
    synthetic_units = [f"synthetic-{i}" for i in range(len(synthetic_images))]
    real_train, real_held = _split_units(list(real_subjects), holdout, rng)
    synthetic_train, synthetic_held = _split_units(synthetic_units, holdout, rng)
    images = np.concatenate([real_images[real_train], synthetic_images[synthetic_train]])
    labels = np.concatenate([np.zeros(len(real_train), np.int64), np.ones(len(synthetic_train), np.int64)])
    order = oversample_minority(labels, rng)  # the smaller side repeated: no class is favoured
    network = build_cnn(images.shape[2:], 2, cnn["channels"], cnn["strides"], True, seed)
    train_network(network, torch.nn.CrossEntropyLoss(), images[order], labels[order], steps=cnn["steps"],
                  batch=cnn["batch"], lr=cnn["lr"], seed=seed, on=device())
    held_images = np.concatenate([real_images[real_held], synthetic_images[synthetic_held]])
    truth = np.concatenate([np.zeros(len(real_held), np.int64), np.ones(len(synthetic_held), np.int64)])
    probabilities = predict_network(network, held_images, categorical=True)
    units = [real_subjects[i] for i in real_held] + [synthetic_units[i] for i in synthetic_held]
    boot = []
    real_units = sorted({real_subjects[i] for i in real_held})
    real_volumes = [np.flatnonzero(np.array(units) == u) for u in real_units]
    synthetic_volumes = np.arange(len(real_held), len(truth))
    for _ in range(bootstrap):
        chosen = rng.integers(0, len(real_units), size=len(real_units))
        idx = np.concatenate([*(real_volumes[i] for i in chosen),
                              rng.choice(synthetic_volumes, size=len(synthetic_volumes))])
        boot.append(balanced_accuracy(probabilities[idx], truth[idx]))
    accuracy = balanced_accuracy(probabilities, truth)
    log.info("two-sample test: balanced accuracy %.3f on %d held-out real and %d synthetic volumes", accuracy,
             len(real_held), len(synthetic_held))
    return {
        "accuracy": accuracy, "ci": interval(boot, confidence), "confidence": confidence, "chance": 0.5,
        "held_out": {"real_subjects": len(real_units), "real_volumes": int(len(real_held)),
                     "synthetic_volumes": int(len(synthetic_held))},
        "train": {"real_volumes": int(len(real_train)), "synthetic_volumes": int(len(synthetic_train))},
        "steps": cnn["steps"], "seed": seed,
    }
