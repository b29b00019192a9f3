"""Precision: whether a run computes in bf16 (train.precision on this device) and the autocast it runs under.

Every backend keeps fp32 weights, fp32 Adam state and an fp32 EMA (engine.py); only the forward/backward
arithmetic runs in bf16 under `autocast`.
"""

from __future__ import annotations

import torch


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this GPU. Emulated bf16 (V100, T4, RTX 20xx) is slower than fp32 and does not count."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision → bf16 or not: "auto" is bf16 on GPUs that have it natively, fp32 elsewhere."""
    if precision == "auto":
        return bf16_supported(device)
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when `bf16`, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
