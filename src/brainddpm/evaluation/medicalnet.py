"""MedicalNet 3D ResNet feature extractor for FID (Chen et al. 2019, "Med3D", 23-dataset weights).

The network is MONAI's ``resnet10`` / ``resnet50`` (3D, one input channel, shortcut B, no bias in
the downsampling convolution, no FC head), adjusted to MedicalNet's own layout: first convolution
with stride 2, and layer3 / layer4 with stride 1 and dilation 2 / 4 (MedicalNet's models/resnet.py).
This changes no parameter shape, so MedicalNet's checkpoints load unchanged; MONAI's own
``pretrained=True`` path keeps stride 1 in conv1 and stride 2 in layer3/4.

Weights are read from a local file only (``download_weights`` is for a separate fetch step on
a node with internet access).  MedicalNet files hold ``{"state_dict": {"module.<key>": tensor}}``.

Features: each volume is z-scored on its own (mean and standard deviation of its non-zero
voxels, as MedicalNet normalises its training data; applied to the whole volume, background
included, without MedicalNet's random background noise so that features are deterministic),
then the last feature map is global-average-pooled: 512 values (resnet10) or 2048 (resnet50).
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import resnet10, resnet50
from torch import nn

from brainddpm.errors import BadInputError, BrainDDPMError

NETWORKS = {"resnet10": (resnet10, 512), "resnet50": (resnet50, 2048)}

FETCH_HINT = (
    "MedicalNet weights are not downloaded during evaluation; fetch them first on a node with "
    "internet access (the workflow's weight-download rule, or "
    "brainddpm.evaluation.medicalnet.download_weights(evaluate.fid.url, evaluate.fid.weights))"
)


def feature_size(network: str) -> int:
    """Number of features the network produces per volume."""
    return _lookup(network)[1]


def _lookup(network: str):
    if network not in NETWORKS:
        raise ValueError(f"unknown MedicalNet network {network!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[network]


def build_network(network: str = "resnet10") -> nn.Module:
    """MedicalNet's 3D ResNet architecture (random weights), built from MONAI's ResNet."""
    factory, _ = _lookup(network)
    model = factory(spatial_dims=3, n_input_channels=1, shortcut_type="B", feed_forward=False,
                    bias_downsample=False, conv1_t_size=7, conv1_t_stride=2)
    for layer, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for m in layer.modules():
            if isinstance(m, nn.Conv3d):
                m.stride = (1, 1, 1)
                if m.kernel_size == (3, 3, 3):
                    m.dilation = (dilation,) * 3
                    m.padding = (dilation,) * 3
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        raise BadInputError(path, f"cannot read as a PyTorch weight file ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInputError(path, "not a state dict (expected {'state_dict': {name: tensor}})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path, network: str = "resnet10") -> nn.Module:
    """Load a MedicalNet checkpoint into ``model``; refuse files of another architecture."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"MedicalNet {network} weights not found. {FETCH_HINT}")
    state = _read_state_dict(path)
    expected = model.state_dict()
    # files saved by old PyTorch lack BatchNorm's num_batches_tracked; BatchNorm fills it in
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if keys]
        raise BadInputError(path, f"does not match the MedicalNet {network} architecture "
                                  f"(is evaluate.fid.network right?): " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def load_medicalnet(network: str, weights: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the network, load the local weights, move to ``device``, set eval mode."""
    model = load_weights(build_network(network), weights, network)
    return model.to(device).eval()


def zscore(volumes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-volume (x - mean) / std with mean, std over `mask` (one brain mask for every volume), else
    over each volume's non-zero voxels (all voxels if none)."""
    x = volumes.to(torch.float32)
    flat = x.reshape(len(x), -1)
    fg = flat != 0 if mask is None else mask.reshape(1, -1).to(flat.device).expand_as(flat)
    fg = torch.where(fg.any(dim=1, keepdim=True), fg, torch.ones_like(fg))
    count = fg.sum(dim=1, keepdim=True)
    mean = (flat * fg).sum(dim=1, keepdim=True) / count
    var = (((flat - mean) * fg) ** 2).sum(dim=1, keepdim=True) / count
    std = var.sqrt().clamp_min(1e-8)
    return ((flat - mean) / std).reshape(x.shape)


def extract_features(volumes, model: nn.Module, batch_size: int = 4,
                     device: str | torch.device = "cpu", mask=None) -> np.ndarray:
    """(N, F) float64 features of (N, 1, D, H, W) volumes (numpy or tensor): z-score, network, avg-pool.

    Give the same `mask` (D, H, W) for real and synthetic volumes: synthetic backgrounds are not exactly
    zero, so per-volume non-zero masks would normalise the two sets differently.
    """
    mask = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
    vol = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes)
    if vol.ndim != 5 or vol.shape[1] != 1:
        raise ValueError(f"volumes must be (N, 1, D, H, W), got {tuple(vol.shape)}")
    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(vol), batch_size):
            batch = zscore(vol[s : s + batch_size].to(device), mask)
            out.append(model(batch).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def download_weights(url: str, dest: str | Path, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` (written under a temporary name, renamed when complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            while block := r.read(1 << 20):
                f.write(block)
        os.replace(tmp, dest)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise BrainDDPMError(f"cannot download {url} to {dest}: {e}") from None
    return dest
