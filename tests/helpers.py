"""Small real inputs for tests: tiny NIfTI brains on a tiny grid, and a matching config."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from brainddpm.config import deep_merge, validate_config
from brainddpm.nifti import grid_affine

ROOT = Path(__file__).resolve().parents[1]
GRID = {"shape": [20, 24, 20], "spacing": [1.0, 1.0, 1.0], "origin": [-10.0, -12.0, -10.0]}
TARGET = [8, 12, 8]


def base_config(**overrides) -> dict:
    """The reference config with a tiny grid, tiny target shape and tiny UNet."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    tiny = {
        "datasets": [{"name": "a", "root": "unused"}],
        "data": {"grid": copy.deepcopy(GRID), "target_shape": list(TARGET), "volumes_per_shard": 3},
        "model": {"channels": [8, 8, 8], "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 8,
                  "use_flash_attention": False},
        "evaluate": {"msssim": {"kernel_size": 3, "scales": 2}},
    }
    return validate_config(deep_merge(deep_merge(cfg, tiny), overrides))


def brain_volume(seed: int, shape=tuple(GRID["shape"])) -> np.ndarray:
    """An ellipsoid 'brain' with smooth texture, zero outside."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * rng.uniform(0.3, 0.42, size=3)
    r = sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    vol = (100 + 50 * np.sin(idx[0] / 2 + rng.uniform(0, 6)) + rng.normal(0, 5, size=shape)) * (r < 1)
    return vol.astype(np.float32)


def write_nifti(path, data, affine=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = grid_affine(GRID["shape"], GRID["spacing"], GRID["origin"])
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def bids_dataset(root, subjects: int, seed: int = 0, sessions: dict | None = None) -> list[Path]:
    """root/sub-XX/ses-YY/anat/sub-XX_ses-YY_T1w.nii.gz for each subject (and extra sessions)."""
    paths = []
    for s in range(subjects):
        for ses in range((sessions or {}).get(s, 1)):
            sub = f"sub-{s:02d}"
            p = Path(root) / sub / f"ses-{ses + 1}" / "anat" / f"{sub}_ses-{ses + 1}_T1w.nii.gz"
            paths.append(write_nifti(p, brain_volume(seed * 1000 + s * 10 + ses)))
    return paths
