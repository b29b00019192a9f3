"""The final model file, ``model.safetensors``: what training hands to sampling and evaluation.

The EMA weights as safetensors, with the model/scheduler/data config (and, for a conditional model, the
covariate encoding), the code version and the step in its metadata: enough for `load_final` to rebuild the
network from that file alone. Written by the training stage, read by sampling and the later stages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from brainddpm import __version__
from brainddpm.errors import CheckpointError
from brainddpm.fileio import atomic_path
from brainddpm.models.conditioning import CovariateEncoding
from brainddpm.models.diffusion import build_model


def save_final(path: Path, weights: dict[str, torch.Tensor], config: dict, step: int) -> None:
    """Write `weights` (the EMA) as safetensors with {"config", "code_version", "step"} metadata, atomically."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in weights.items()}
    meta = {"config": json.dumps(config, sort_keys=True), "code_version": __version__, "step": str(int(step))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; others in the project group read it


def read_final(path: Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config (with "code_version" and "step") and, if `tensors`, the weights of ``model.safetensors``."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: final model not found (train first)") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: has no 'config' metadata; it was not written by brainddpm")
    config = json.loads(meta["config"])
    config.update(code_version=meta.get("code_version"), step=int(meta.get("step", -1)))
    return config, weights


def load_final(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the trained network from ``model.safetensors`` alone: (model in eval mode, config dict).

    The config dict holds "model", "scheduler" and "data" (target_shape, affine, intensity_range; for a latent
    model also latent_shape, scale_factor and autoencoder_sha256), for a conditional
    model "condition" (the covariate encoding, models/conditioning.py), plus "code_version" and
    "step" from the file's metadata.
    """
    config, weights = read_final(path)
    if config.get("kind") == "autoencoder":
        raise CheckpointError(f"{path}: is an autoencoder, not a diffusion model (train's model.safetensors)")
    context_dim = CovariateEncoding.from_dict(config["condition"]).dim if "condition" in config else None
    channels = config["data"].get("latent_shape", [1])[0]  # a latent model's in/out channels
    model = build_model(config["model"], context_dim, channels)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), config

