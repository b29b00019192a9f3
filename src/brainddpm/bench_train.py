"""Training throughput: samples/s, model FLOPs utilisation (MFU) and peak memory.

Also the helpers that train.py uses to report the same numbers per epoch. FLOPs are counted once with
torch.utils.flop_counter.FlopCounterMode on one forward+backward of one volume (convolutions, matmuls,
attention; the elementwise and normalisation ops are not counted, as usual for MFU) and divided by the
device's dense bf16 peak. MFU is None on devices not in the table (and on CPU).
"""

from __future__ import annotations

import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import build_model, build_scheduler, diffusion_loss

# Dense (no sparsity) bf16 tensor-core peak FLOP/s, matched against torch.cuda.get_device_name().
# More specific names first: the H100 PCIe has a lower peak than the SXM part.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),  # SXM and PCIe, 40 and 64/80 GB (LEONARDO Booster's custom A100 64 GB included)
]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when `bf16`, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def flops_per_sample(model: torch.nn.Module, shape, device: torch.device, bf16: bool,
                     num_train_timesteps: int = 1000) -> int:
    """FLOPs of one training forward+backward for one volume of `shape` (D, H, W). Leaves no gradients."""
    x = torch.rand(1, 1, *shape, device=device)
    t = torch.randint(0, num_train_timesteps, (1,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, bf16):
            out = model(x, timesteps=t)
        out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def mfu(flops_sample: int | None, samples_per_s: float | None, device: torch.device) -> float | None:
    """Model FLOPs utilisation of one device: achieved FLOP/s over its peak; None when unknown."""
    peak = peak_flops(device)
    if peak is None or not flops_sample or not samples_per_s:
        return None
    return flops_sample * samples_per_s / peak


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


def bench_train(model_cfg: dict, sched_cfg: dict, target_shape, batch: int, steps: int,
                device: str | torch.device | None = None, warmup: int = 3, lr: float = 1e-4) -> dict:
    """Time `steps` Adam training steps of the UNet on random volumes after `warmup` untimed ones.

    bf16 autocast on GPU, fp32 on CPU, one process. Returns steps/s, samples/s, FLOPs per sample,
    achieved TFLOP/s, MFU (None on CPU) and peak memory.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda"
    torch.backends.cudnn.benchmark = bf16  # as in training (launch.setup_distributed)
    torch.manual_seed(0)
    net = build_model(model_cfg).to(device).train()
    scheduler = build_scheduler(sched_cfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = torch.rand(batch, 1, *target_shape, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    fps = flops_per_sample(net, target_shape, device, bf16, scheduler.num_train_timesteps)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            reset_peak_memory(device)
            t0 = time.perf_counter()
        with autocast(device, bf16):
            loss = diffusion_loss(net, scheduler, x, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    samples_per_s = steps * batch / elapsed
    return {
        "device": device_name(device), "precision": "bf16" if bf16 else "fp32", "batch": batch, "steps": steps,
        "target_shape": list(target_shape), "parameters": sum(p.numel() for p in net.parameters()),
        "steps_per_s": steps / elapsed, "samples_per_s": samples_per_s, "flops_per_sample": fps,
        "tflops_per_s": fps * samples_per_s / 1e12, "mfu": mfu(fps, samples_per_s, device),
        "peak_memory_bytes": peak_memory(device), "final_loss": loss.item(),
    }
