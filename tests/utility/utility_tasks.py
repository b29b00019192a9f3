"""A tiny downstream task on 16^3 'brains' where more training data clearly helps, written as real shards.

Every volume is an ellipsoid of random size and texture with voxel noise; the 'patients' (label
"patient") have a small darker blob at a fixed place. The blob is subtle against the noise and the
nuisance variation, so a model trained on a dozen volumes is much worse than one trained on three dozen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainddpm.data.nifti import grid_affine
from brainddpm.data.shards import write_index, write_shard

SHAPE = (16, 16, 16)
AFFINE = grid_affine(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def brains(labels, seed: int, blob: float = 0.2, noise: float = 0.2) -> np.ndarray:
    """(N, 1, 16, 16, 16) volumes in [0, 1]; label 1 adds the dark blob."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    spot = sum((idx[k] - c) ** 2 for k, c in enumerate((5.0, 9.0, 8.0))) < 2.5 ** 2
    out = []
    for label in labels:
        radii = rng.uniform(5.5, 6.5, size=3)
        inside = sum(((idx[k] - 7.5) / radii[k]) ** 2 for k in range(3)) < 1
        tissue = 0.6 + 0.05 * np.sin(idx[rng.integers(3)] / rng.uniform(1.5, 3) + rng.uniform(0, 6))
        vol = inside * (tissue - blob * label * spot + rng.normal(0, noise, size=SHAPE))
        out.append(np.clip(vol, 0, 1).astype(np.float32))
    return np.stack(out)[:, None]


def write_volumes(path: Path, images, subjects, diagnoses, split="train", **attrs) -> Path:
    """One shard (with index.json for a split folder, or alone as a sample part file when `split` is None)."""
    meta = [{"subject": s, "covariates": {"diagnosis": d, "age": 50.0}} for s, d in zip(subjects, diagnoses)]
    if split is None:
        write_shard(path, images, meta, AFFINE, dtype="float32", compression="none", attrs=attrs)
        return path
    summary = write_shard(path / "shard-000.h5", images, meta, AFFINE, dtype="float32", compression="none")
    write_index(split, [summary], path / "index.json")
    return path


def labelled(n: int, seed: int, **kw):
    """n volumes, half of them patients (alternating), with their diagnosis strings."""
    labels = np.arange(n) % 2
    return brains(labels, seed, **kw), ["patient" if y else "control" for y in labels]


def study(root: Path, n_train: int = 12, n_test_subjects: int = 20, n_extra: int = 24, seed: int = 0) -> dict:
    """Train split (n_train subjects), val split (test subjects, two sessions each), and an 'oracle' sample
    part of n_extra more real volumes from the same distribution (subjects of neither split)."""
    images, diagnosis = labelled(n_train, seed)
    train = write_volumes(root / "train", images, [f"t{i:03d}" for i in range(n_train)], diagnosis)
    labels = np.repeat(np.arange(n_test_subjects) % 2, 2)  # two sessions per subject, same diagnosis
    test_images = brains(labels, seed + 1)
    val = write_volumes(root / "val", test_images, [f"v{i // 2:03d}" for i in range(len(labels))],
                        ["patient" if y else "control" for y in labels], split="val")
    images, diagnosis = labelled(n_extra, seed + 2)
    oracle = write_volumes(root / "oracle" / "part-000.h5", images, [f"synthetic-{i:04d}" for i in range(n_extra)],
                           diagnosis, split=None, sampler="oracle")
    rng = np.random.default_rng(seed + 3)
    noise = write_volumes(root / "noise" / "part-000.h5", rng.uniform(0, 1, size=(n_extra, 1, *SHAPE)),
                          [f"synthetic-{i:04d}" for i in range(n_extra)], diagnosis, split=None, sampler="noise")
    return {"train": train, "val": val, "oracle": [oracle], "noise": [noise]}
