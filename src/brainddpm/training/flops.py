"""FLOPs and MFU, shared by the training loop and `brainddpm bench`, with the device facts reported beside
them (the device's name, its peak memory) and `synchronize` for timing.

FLOPs are counted once with torch.utils.flop_counter.FlopCounterMode on one forward+backward of one
volume (convolutions, matmuls, attention; elementwise and normalisation ops are not counted, as usual
for MFU). MFU divides the achieved FLOP/s by the device's dense peak *for the precision the run uses*:
the bf16 tensor-core peak for bf16 runs, the TF32 peak for fp32 runs (PyTorch runs fp32 convolutions
on TF32 tensor cores by default). MFU is None on CPUs and on GPUs not in the table.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from brainddpm.training.precision import autocast

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name(); the first key contained in the name wins, so the more specific names
# (H100 NVL, H100 PCIe) come before the SXM part ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835e12, "fp32": 417.5e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp32": 494.7e12}),  # SXM5
    ("H200", {"bf16": 989e12, "fp32": 494.7e12}),
    ("A100", {"bf16": 312e12, "fp32": 156e12}),  # SXM and PCIe, 40/64/80 GB (LEONARDO's A100 64 GB too)
]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `device` for `precision` ("bf16" or "fp32"), or None when unknown."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_FLOPS if key in name), None)


def flops_per_sample(model: torch.nn.Module, shape, device: torch.device, bf16: bool,
                     num_train_timesteps: int = 1000, context_dim: int | None = None, channels: int = 1) -> int:
    """FLOPs of one training forward+backward of a diffusion UNet for one volume of `shape` (D, H, W) with
    `channels` channels (a latent model: the latent channels).

    `context_dim`: a conditional model's covariate vector length (its forward needs a `context`)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, num_train_timesteps, (1,), device=device)
        kwargs = {"context": torch.zeros(1, 1, context_dim, device=device)} if context_dim else {}
        return model(x, timesteps=t, **kwargs)

    return count_flops(forward, model, [channels, *shape], device, bf16)


def count_flops(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, shape, device: torch.device,
                bf16: bool) -> int:
    """FLOPs of `forward` on one input of `shape` (C, D, H, W) and of its backward (torch's FlopCounterMode).
    Leaves no gradients in `model`."""
    x = torch.rand(1, *shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, bf16):
            out = forward(x)
        out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def mfu(flops_per_volume: int | None, samples_per_s: float | None, device: torch.device,
        precision: str = "bf16") -> float | None:
    """Model FLOPs utilisation of one device: achieved FLOP/s over its peak for `precision`."""
    peak = peak_flops(device, precision)
    if peak is None or not flops_per_volume or not samples_per_s:
        return None
    return flops_per_volume * samples_per_s / peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak allocated GPU memory in bytes; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
