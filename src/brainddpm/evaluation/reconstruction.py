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

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.device import pick_device
from brainddpm.encoding.encode import check_image_shape
from brainddpm.evaluation.bootstrap import subject_means_ci
from brainddpm.fileio import atomic_path
from brainddpm.models.autoencoder import decode_latents, encode_volumes, load_autoencoder

log = logging.getLogger(__name__)

DEFINITIONS = {
    "psnr": "PSNR in dB, 10 log10(1 / MSE) over the whole volume (intensities in [0, 1])",
    "ssim": "SSIM, MONAI SSIMMetric (3D, Gaussian window 11, sigma 1.5), whole volume",
    "mae": "mean absolute error over the whole volume",
}


@torch.no_grad()
def reconstruct(autoencoder, config: dict, volumes: np.ndarray, decode_cfg: dict | None,
                device: torch.device) -> np.ndarray:
    """Reconstructions of `volumes` [N, 1, D, H, W] through the scaled latent, one volume at a time."""
    scale, shape = float(config["scale_factor"]), volumes.shape[2:]
    out = []
    for vol in volumes:
        x = torch.from_numpy(np.asarray(vol, dtype=np.float32))[None].to(device)
        z = encode_volumes(autoencoder, x, config["autoencoder"]) * scale
        out.append(decode_latents(autoencoder, z, scale, shape, decode_cfg)[0].cpu().numpy())
    return np.stack(out)


def reconstruction_scores(real: np.ndarray, recon: np.ndarray) -> dict[str, np.ndarray]:
    """Per-volume PSNR, SSIM and MAE of `recon` against `real` (both [N, 1, D, H, W] in [0, 1])."""
    from monai.metrics import SSIMMetric

    mse = ((recon - real) ** 2).reshape(len(real), -1).mean(1)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="none")(torch.from_numpy(recon).float(),
                                                                         torch.from_numpy(real).float())
    return {"psnr": 10 * np.log10(1.0 / np.maximum(mse, 1e-12)), "ssim": ssim.reshape(-1).numpy(),
            "mae": np.abs(recon - real).reshape(len(real), -1).mean(1)}


def run_reconstruction(autoencoder_path: Path, val_dir: Path, decode_cfg: dict | None, seed: int, n_boot: int,
                       out: Path, png: Path | None = None, device_name: str = "auto") -> dict:
    """Write reconstruction.json (and a slice figure); returns the JSON's content."""
    device = pick_device(device_name)
    autoencoder, config = load_autoencoder(autoencoder_path, device)
    files = split_files(val_dir)
    real, meta, _ = read_volumes(files)
    check_image_shape(autoencoder_path, config, files[0], real.shape[2:])
    recon = reconstruct(autoencoder, config, real, decode_cfg, device)
    scores = reconstruction_scores(real, recon)
    doc = {"n": len(real), "n_subjects": len({m["subject"] for m in meta}), "autoencoder": str(autoencoder_path),
           "autoencoder_sha256": config["sha256"], "autoencoder_step": config.get("step"),
           "scale_factor": config["scale_factor"], "decode": decode_cfg or {"roi": None},
           "metrics": subject_means_ci(scores, [m["subject"] for m in meta], n_boot, seed),
           "per_volume": {k: [float(v) for v in vals] for k, vals in scores.items()}, "definitions": DEFINITIONS}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    if png is not None:
        plot_reconstructions(real, recon, png)
    m = doc["metrics"]
    log.info("reconstruction of %d validation volumes: PSNR %.2f dB, SSIM %.3f, MAE %.4f", len(real),
             m["psnr"]["value"], m["ssim"]["value"], m["mae"]["value"])
    return doc


def plot_reconstructions(real: np.ndarray, recon: np.ndarray, png: Path, k: int = 3) -> None:
    """Mid slices of the first `k` validation volumes (top) and their reconstructions (below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(k, len(real))
    fig, axes = plt.subplots(2 * k, 3, figsize=(6, 4 * k), squeeze=False)
    for i in range(k):
        for row, vol, name in ((2 * i, real[i, 0], f"validation {i}"), (2 * i + 1, recon[i, 0], "reconstruction")):
            cx, cy, cz = (s // 2 for s in vol.shape)
            for ax, sl in zip(axes[row], (vol[:, :, cz], vol[:, cy, :], vol[cx, :, :])):
                ax.imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
                ax.set_axis_off()
            axes[row][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
