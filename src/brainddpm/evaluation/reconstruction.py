"""How well the autoencoder reconstructs unseen volumes: the ceiling of what latent diffusion can reach.

Every validation volume goes through exactly the path of a sampled latent: encoded (posterior mean) and
multiplied by the scale factor, then decoded as sampling decodes (`decode` section: whole, or by windows
with Gaussian blending), cropped to the image grid and clipped to [0, 1]. Per volume: PSNR (data range 1),
SSIM (MONAI's SSIMMetric, 3D Gaussian window) and the mean absolute error; means with 95% intervals from
resampling validation subjects (evaluation/bootstrap.subject_means_ci).

Beside it, the naive baselines an autoencoder has to beat: each volume average-pooled by 2 and by 4 per axis
(and by the autoencoder's own factor) and trilinearly upsampled back, scored the same way. Naive 2x keeps one
number per 8 voxels; an autoencoder of factor f with c latent channels keeps c / f^3 per voxel (both in the JSON),
so a 2x autoencoder with 4 channels holds 4x more numbers than naive 2x and should beat it clearly. The gain over
naive pooling at the autoencoder's factor is a paired per-volume difference with its own subject-level interval.
Written here because it is two torch calls (area pooling, trilinear upsampling); no library names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from brainddpm.data.shards import open_shard, read_meta, split_files
from brainddpm.device import pick_device
from brainddpm.encoding.encode import check_image_shape
from brainddpm.evaluation.bootstrap import subject_means_ci
from brainddpm.fileio import atomic_path
from brainddpm.models.autoencoder import compression, decode_latents, encode_volumes, load_autoencoder

log = logging.getLogger(__name__)

FIGURE_VOLUMES = 3  # validation volumes shown with their reconstructions
NAIVE_FACTORS = (2, 4)  # naive pooling baselines, per axis (the autoencoder's own factor is added)
DEFINITIONS = {
    "psnr": "PSNR in dB, 10 log10(1 / MSE) over the whole volume (intensities in [0, 1])",
    "ssim": "SSIM, MONAI SSIMMetric (3D, Gaussian window 11, sigma 1.5), whole volume",
    "mae": "mean absolute error over the whole volume",
}


@torch.no_grad()
def reconstruct(autoencoder, config: dict, volume: np.ndarray, decode_cfg: dict | None,
                device: torch.device) -> np.ndarray:
    """The reconstruction of one volume [1, D, H, W] through its scaled latent."""
    scale = float(config["scale_factor"])
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None].to(device)
    z = encode_volumes(autoencoder, x, config["autoencoder"]) * scale
    return decode_latents(autoencoder, z, scale, volume.shape[1:], decode_cfg)[0].cpu().numpy()


def naive_pooling(volume: np.ndarray, factor: int) -> np.ndarray:
    """One volume [1, D, H, W] average-pooled by `factor` per axis (area: the mean of each block, a partial
    block at an edge included) and trilinearly upsampled back to its shape."""
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None]
    small = torch.nn.functional.interpolate(x, size=[-(-s // factor) for s in x.shape[2:]], mode="area")
    back = torch.nn.functional.interpolate(small, size=list(x.shape[2:]), mode="trilinear", align_corners=False)
    return back[0].clamp(0, 1).numpy()


def reconstruction_scores(real: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and MAE of one reconstruction against its volume (both [1, D, H, W] in [0, 1])."""
    from monai.metrics import SSIMMetric

    mse = float(((recon - real) ** 2).mean())
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)(torch.from_numpy(recon[None]).float(),
                                                      torch.from_numpy(real[None]).float())
    return {"psnr": 10 * np.log10(1.0 / max(mse, 1e-12)), "ssim": float(ssim.mean()),
            "mae": float(np.abs(recon - real).mean())}


def run_reconstruction(autoencoder_path: Path, val_dir: Path, decode_cfg: dict | None, seed: int, n_boot: int,
                       out: Path, png: Path | None = None, device_name: str = "auto") -> dict:
    """Write reconstruction.json (and a slice figure); returns the JSON's content."""
    device = pick_device(device_name)
    autoencoder, config = load_autoencoder(autoencoder_path, device)
    factor = compression(config["autoencoder"])
    factors = sorted({*NAIVE_FACTORS, factor})
    scores = {"autoencoder": _empty_scores(), **{f"naive_{f}x": _empty_scores() for f in factors}}
    meta, shown = [], []
    for path in split_files(val_dir):  # one volume in memory at a time (1 mm volumes are 28 MB each)
        meta += read_meta(path)
        with open_shard(path) as f:
            check_image_shape(autoencoder_path, config, path, f["images"].shape[2:])
            for i in range(len(f["images"])):
                real = np.asarray(f["images"][i], dtype=np.float32)
                recon = reconstruct(autoencoder, config, real, decode_cfg, device)
                naive = {n: naive_pooling(real, n) for n in factors}
                _append(scores["autoencoder"], reconstruction_scores(real, recon))
                for n in factors:
                    _append(scores[f"naive_{n}x"], reconstruction_scores(real, naive[n]))
                if len(shown) < FIGURE_VOLUMES:
                    shown.append((real, recon, naive[2]))
    subjects = [m["subject"] for m in meta]
    scores = {arm: {k: np.asarray(v) for k, v in arm_scores.items()} for arm, arm_scores in scores.items()}
    own = scores[f"naive_{factor}x"]
    gain = {"psnr": scores["autoencoder"]["psnr"] - own["psnr"], "ssim": scores["autoencoder"]["ssim"] - own["ssim"]}
    ae_cfg = config["autoencoder"]
    doc = {"n": len(meta), "n_subjects": len(set(subjects)), "autoencoder": str(autoencoder_path),
           "autoencoder_sha256": config["sha256"], "autoencoder_step": config.get("step"),
           "scale_factor": config["scale_factor"], "decode": decode_cfg or {"roi": None},
           "compression": factor, "latent_channels": int(ae_cfg["latent_channels"]),
           "numbers_per_voxel": {"autoencoder": int(ae_cfg["latent_channels"]) / factor ** 3,
                                 **{f"naive_{n}x": 1 / n ** 3 for n in factors}},
           "metrics": subject_means_ci(scores["autoencoder"], subjects, n_boot, seed),
           "per_volume": _listed(scores["autoencoder"]),
           "baselines": {arm: {"metrics": subject_means_ci(vals, subjects, n_boot, seed), "per_volume": _listed(vals)}
                         for arm, vals in scores.items() if arm != "autoencoder"},
           "gain_over_naive": {"factor": factor, "metrics": subject_means_ci(gain, subjects, n_boot, seed)},
           "definitions": DEFINITIONS}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    if png is not None:
        plot_reconstructions(*(np.stack([row[k] for row in shown]) for k in range(3)), png)
    m, g = doc["metrics"], doc["gain_over_naive"]["metrics"]
    log.info("reconstruction of %d validation volumes: PSNR %.2f dB, SSIM %.3f, MAE %.4f; over naive %dx "
             "pooling: PSNR %+.2f dB, SSIM %+.3f", len(meta), m["psnr"]["value"], m["ssim"]["value"],
             m["mae"]["value"], factor, g["psnr"]["value"], g["ssim"]["value"])
    return doc


def _empty_scores() -> dict[str, list]:
    return {"psnr": [], "ssim": [], "mae": []}


def _append(scores: dict[str, list], values: dict[str, float]) -> None:
    for name, value in values.items():
        scores[name].append(value)


def _listed(scores: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in scores.items()}


def plot_reconstructions(real: np.ndarray, recon: np.ndarray, naive: np.ndarray, png: Path) -> None:
    """Mid slices of validation volumes [k, 1, D, H, W], each followed by its reconstruction and by naive 2x
    pooling: the sampling stage's contact sheet, one row per volume."""
    from brainddpm.sampling.sample import contact_sheet

    rows = [v for r, c, n in zip(real[:, 0], recon[:, 0], naive[:, 0]) for v in (r, c, n)]
    names = [n for i in range(len(real)) for n in (f"validation {i}", "autoencoder", "naive 2x pooling")]
    contact_sheet(np.stack(rows), names, png)
