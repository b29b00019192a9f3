"""How well the autoencoder reconstructs unseen volumes: the ceiling of what latent diffusion can reach.

Every validation volume goes through exactly the path of a sampled latent: encoded (posterior mean) and
multiplied by the scale factor, then decoded as sampling decodes (`decode` section: whole, or by windows
with Gaussian blending), cropped to the image grid and clipped to [0, 1]. Per volume: PSNR (data range 1),
SSIM (MONAI's SSIMMetric, 3D Gaussian window) and the mean absolute error; means with 95% intervals from
resampling validation subjects (evaluation/bootstrap.subject_means_ci).
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
from brainddpm.models.autoencoder import decode_latents, encode_volumes, load_autoencoder

log = logging.getLogger(__name__)

FIGURE_VOLUMES = 3  # validation volumes shown with their reconstructions
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
    scores, meta, shown = {"psnr": [], "ssim": [], "mae": []}, [], []
    for path in split_files(val_dir):  # one volume in memory at a time (1 mm volumes are 28 MB each)
        meta += read_meta(path)
        with open_shard(path) as f:
            check_image_shape(autoencoder_path, config, path, f["images"].shape[2:])
            for i in range(len(f["images"])):
                real = np.asarray(f["images"][i], dtype=np.float32)
                recon = reconstruct(autoencoder, config, real, decode_cfg, device)
                for name, value in reconstruction_scores(real, recon).items():
                    scores[name].append(value)
                if len(shown) < FIGURE_VOLUMES:
                    shown.append((real, recon))
    scores = {k: np.asarray(v) for k, v in scores.items()}
    doc = {"n": len(meta), "n_subjects": len({m["subject"] for m in meta}), "autoencoder": str(autoencoder_path),
           "autoencoder_sha256": config["sha256"], "autoencoder_step": config.get("step"),
           "scale_factor": config["scale_factor"], "decode": decode_cfg or {"roi": None},
           "metrics": subject_means_ci(scores, [m["subject"] for m in meta], n_boot, seed),
           "per_volume": {k: [float(v) for v in vals] for k, vals in scores.items()}, "definitions": DEFINITIONS}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    if png is not None:
        plot_reconstructions(np.stack([r for r, _ in shown]), np.stack([c for _, c in shown]), png)
    m = doc["metrics"]
    log.info("reconstruction of %d validation volumes: PSNR %.2f dB, SSIM %.3f, MAE %.4f", len(meta),
             m["psnr"]["value"], m["ssim"]["value"], m["mae"]["value"])
    return doc


def plot_reconstructions(real: np.ndarray, recon: np.ndarray, png: Path) -> None:
    """Mid slices of validation volumes [k, 1, D, H, W], each followed by its reconstruction: the sampling
    stage's contact sheet, one row per volume."""
    from brainddpm.sampling.sample import contact_sheet

    pairs = [v for r, c in zip(real[:, 0], recon[:, 0]) for v in (r, c)]
    names = [n for i in range(len(real)) for n in (f"validation {i}", "reconstruction")]
    contact_sheet(np.stack(pairs), names, png)
