"""Small real inputs for tests: tiny NIfTI brains on a tiny grid, and a matching config."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import yaml

from brainddpm.config import deep_merge, validate_config
from brainddpm.data.nifti import grid_affine
from brainddpm.data.shards import write_index, write_shard
from brainddpm.sampling.sample import run_sample

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
        # sampling unit tests pass no mask rule; masking: tests/sampling/test_background.py, test_sample.py
        "sample": {"background": "keep"},
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


# ---- tiny training runs (16^3 volumes) ----

SHAPE = (16, 16, 16)


def make_shards(split_dir: Path, n: int = 8, seed: int = 0) -> Path:
    """A training split of `n` ellipsoid 'brains' of 16^3 voxels in [0, 1], in one shard."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    vols = []
    for _ in range(n):
        r = sum(((idx[k] - 7.5) / rng.uniform(4, 7)) ** 2 for k in range(3))
        vols.append((r < 1) * rng.uniform(0.5, 1.0) * (0.8 + 0.2 * np.sin(idx[0] / 2)))
    summary = write_shard(split_dir / "shard-000.h5", np.stack(vols), [{"subject": f"s{i}"} for i in range(n)],
                          grid_affine(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), dtype="float32",
                          compression="none")
    write_index("train", [summary], split_dir / "index.json")
    return split_dir


def tiny_config(**train) -> dict:
    """Reference config with a tiny UNet, 16^3 volumes, one CPU process, no workers."""
    return base_config(
        data={"target_shape": list(SHAPE)},
        train={"max_steps": 6, "micro_batch": 2, "lr": 1e-3, "ema_decay": 0.9, "num_workers": 0,
               "cache_in_memory": True, "checkpoint_every": 3, "keep_last": 2, "log_every": 2,
               "backend": "ddp", "zero_stage": 0, **train},
        launch={"executor": "inprocess", "gpus_per_node": 0, "max_requeues": 2},
    )


def losses(out_dir: Path, live: bool = False) -> list[tuple[int, float]]:
    """Rows of loss.csv; `live`: the log that grows during training (checkpoints/loss.csv)."""
    path = out_dir / "checkpoints" / "loss.csv" if live else out_dir / "loss.csv"
    if live and not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def launch_config(**sections) -> dict:
    return deep_merge(tiny_config(), sections)



# ---- sampling ----

def sample_jobs(cfg, ckpt, tmp, jobs, sampler="ddpm", device="cpu", performance=None):
    """Sample 6 volumes (batch 2) in `jobs` sampling jobs; (volumes, names) in order."""
    sc = {**cfg["sample"], "n": 6, "batch": 2, "jobs": jobs, "device": device, "ddim_steps": 5, "rflow_steps": 5}
    vols, names = [], []
    for part in range(jobs):
        out = tmp / f"j{jobs}" / f"part-{part:03d}.h5"
        run_sample(sc, ckpt, sampler, part, out, tmp / f"j{jobs}" / f"nifti-{part:03d}", tmp / f"j{jobs}" / "s.png",
                   performance=performance)
        with h5py.File(out) as f:
            vols.append(f["images"][()])
            names += [s.decode() for s in f["subject"][()]]
    return np.concatenate(vols), names



# ---- conditioning: 'brains' whose ventricles grow with age ----

COND = {"covariates": [{"name": "age", "type": "continuous"}, {"name": "sex", "type": "categorical"}],
        "drop_prob": 0.15, "missing": "drop"}


def aging_brains(ages, seed: int) -> np.ndarray:
    """Ellipsoid 'brains' in [0, 1] whose dark core ('ventricles') widens with age (radius 1.5 voxels at 20,
    4 at 85); tissue texture and size vary at random."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    out = []
    for age in ages:
        radii = rng.uniform(5.5, 7.0, size=3)
        r = sum(((idx[k] - 7.5) / radii[k]) ** 2 for k in range(3))
        core = 1.5 + 2.5 * (age - 20) / 65
        c = sum((idx[k] - 7.5) ** 2 for k in range(3)) < core ** 2
        tissue = 0.75 + 0.1 * np.sin(idx[1] / 1.5 + rng.uniform(0, 6))
        out.append(((r < 1) * np.where(c, 0.2, tissue)).astype(np.float32))
    return np.stack(out)[:, None]


def write_split(path, vols, covariates, split="train", **extra) -> list:
    meta = [{"subject": f"s{i:03d}", "covariates": c, **{k: v[i] for k, v in extra.items()}}
            for i, c in enumerate(covariates)]
    summary = write_shard(path / "shard-000.h5", vols, meta, grid_affine(SHAPE, (1.0,) * 3, (0.0,) * 3),
                          dtype="float32", compression="none")
    write_index(split, [summary], path / "index.json")
    return [path / "shard-000.h5"]



# ---- latent diffusion: a tiny autoencoder (4x compression) on the 16^3 volumes ----

TINY_AUTOENCODER = {"channels": [4, 8, 8], "latent_channels": 2, "num_res_blocks": 1,
                    "attention_levels": [False, False, False], "norm_num_groups": 4, "use_checkpoint": False,
                    "pad_multiple": 4, "patch": None, "kl_weight": 1e-6,
                    "adversarial": {"weight": 0.0, "start_step": 0, "channels": 4, "layers": 2, "lr": None},
                    "perceptual": {"weight": 0.0, "network": "medicalnet_resnet10_23datasets", "cache_dir": "unused"},
                    "train": {}}


def autoencoder_config(**autoencoder) -> dict:
    """tiny_config with the tiny autoencoder (its `train` merged in, as `brainddpm train-autoencoder` does)."""
    from brainddpm.config import autoencoder_training

    cfg = tiny_config()
    cfg["autoencoder"] = deep_merge(TINY_AUTOENCODER, autoencoder)
    return autoencoder_training(validate_config(cfg))


LATENT_UNET = {"kind": "latent", "channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
               "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}


def latent_chain(tmp: Path, gpus: int, **train) -> tuple[dict, dict, Path]:
    """The latent path in one go, as its rules run it: autoencoder (adversarial loss on) -> latent shards and
    their index -> latent UNet -> 2 sampled volumes decoded (device: the GPU when `gpus`, else the CPU).
    Returns the two train.json contents and the sample part."""
    from brainddpm.data.prepare import run_index
    from brainddpm.encoding.encode import run_encode
    from brainddpm.training.loop import train as run_train

    device = "cuda" if gpus else "cpu"
    shards = make_shards(tmp / "shards", n=8)
    cfg = autoencoder_config(train={"max_steps": 4, "checkpoint_every": 4, **train},
                             adversarial={"weight": 0.1, "start_step": 1})
    cfg["launch"] = {**cfg["launch"], "gpus_per_node": gpus}
    autoencoder_info = run_train(cfg, shards, tmp / "ae", kind="autoencoder")
    autoencoder = tmp / "ae" / "autoencoder.safetensors"
    run_encode(autoencoder, shards / "shard-000.h5", tmp / "latents" / "shard-000.h5", device)
    run_index("train", [tmp / "latents" / "shard-000.h5"], tmp / "latents" / "index.json")
    latent_cfg = deep_merge(tiny_config(max_steps=3, **train),
                            {"model": LATENT_UNET, "launch": {"gpus_per_node": gpus}})
    latent_info = run_train(latent_cfg, tmp / "latents", tmp / "run")
    part = tmp / "samples" / "part-000.h5"
    sample = {**latent_cfg["sample"], "n": 2, "batch": 2, "jobs": 1, "device": device, "ddim_steps": 4}
    run_sample(sample, tmp / "run" / "model.safetensors", "ddim", 0, part, tmp / "samples" / "nifti",
               tmp / "samples" / "sheet.png", autoencoder=autoencoder)
    return autoencoder_info, latent_info, part
