"""Encode image shards into latent shards (one job per shard, like the data stage's shards).

Every volume is encoded alone (batch of one) to its posterior mean: a volume's latent is the same whatever
the number of jobs or the batch, bit for bit on one device. The latents are stored multiplied by the
autoencoder's scale factor, in the shard layout of data/shards.py with kind "latents" and the attributes
`scale_factor`, `autoencoder_sha256`, `image_shape` and `latent_shape`; the stored `affine` stays the image
grid's, which decoded volumes are written on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from brainddpm.data.shards import open_shard, read_meta, write_shard
from brainddpm.device import pick_device
from brainddpm.errors import BadInputError
from brainddpm.models.autoencoder import encode_volumes, latent_shape, load_autoencoder

log = logging.getLogger(__name__)


def check_image_shape(autoencoder_path: Path, config: dict, shard: Path, shape) -> None:
    """An autoencoder trained on volumes of another shape than `shard`'s is refused, naming both. (One of another
    run with the same shape passes here; sampling refuses it by the sha256 the latent model records.)"""
    trained = list(config["data"]["target_shape"])
    if list(shape) != trained:
        raise BadInputError(shard, f"holds volumes of {list(shape)}, but the autoencoder {autoencoder_path} was "
                            f"trained on {trained} (another run or data.target_shape): train the autoencoder on "
                            "these shards")


def run_encode(autoencoder_path: Path, shard: Path, out: Path, device_name: str = "auto") -> dict:
    """Write the latent shard of one image shard; returns its summary (data/shards.write_shard)."""
    device = pick_device(device_name)
    autoencoder, config = load_autoencoder(autoencoder_path, device)
    ae_cfg, scale = config["autoencoder"], float(config["scale_factor"])
    with open_shard(shard) as f:
        images, affine = f["images"], f["affine"][()]
        check_image_shape(autoencoder_path, config, shard, images.shape[2:])
        latents = []
        for i in range(len(images)):
            x = torch.from_numpy(np.asarray(images[i], dtype=np.float32))[None].to(device)
            latents.append((encode_volumes(autoencoder, x, ae_cfg) * scale)[0].cpu().numpy())
        image_shape = list(images.shape[2:])
    meta = read_meta(shard)
    summary = write_shard(
        out, np.stack(latents), meta, affine, dtype="float32", compression="lzf",
        attrs={"kind": "latents", "scale_factor": scale, "autoencoder_sha256": config["sha256"],
               "image_shape": image_shape, "latent_shape": list(latent_shape(ae_cfg, image_shape)),
               "source_shard": str(shard)})
    log.info("encoded %d volumes of %s into %s (latents %s, scale factor %.5f)", len(latents), shard, out,
             latent_shape(ae_cfg, image_shape), scale)
    return summary
