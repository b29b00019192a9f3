"""The sections of `brainddpm bench gpu` (bench/node.py), each a function of a `Node` that returns its row.

Training rows go through `bench_train` (the training loop's `Engine`), the baseline through `bench_baseline`
(the MONAI tutorial's step), sampling through the sampling stage's own `fast_model` and `denoise`, decoding
through `decode_latents` as `sample_part` calls it. Timing is CUDA-synchronised; first calls (cuDNN's
autotuning, compiling) are timed apart as warm-up.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch

from brainddpm.bench.train import _cleanup, bench_baseline, bench_train
from brainddpm.config import performance_section
from brainddpm.device import resolve_performance
from brainddpm.models.autoencoder import build_autoencoder, decode_latents
from brainddpm.models.diffusion import build_model
from brainddpm.sampling.sample import denoise, fast_model, make_scheduler
from brainddpm.training.flops import device_name, flops_per_sample, peak_memory, reset_peak_memory, synchronize


def environment_row(node) -> dict:
    """The device, its memory and the library versions."""
    from brainddpm import __version__
    from brainddpm.bench.suite import environment

    row = {**environment(node.device), "brainddpm": __version__, "python_executable_cpus": os.cpu_count(),
           "platform": platform.platform()}
    if node.cuda:
        p = torch.cuda.get_device_properties(node.device)
        row.update(sm_count=p.multi_processor_count, memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}")
    return row


def ceilings_row(node) -> dict:
    """bf16 matrix product (8192³ on a GPU) and a device-to-device copy: what the node reaches at best."""
    n, reps = (8192, 20) if node.cuda else (256, 3)
    a = torch.randn(n, n, device=node.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=node.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(node.device)
    t = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    synchronize(node.device)
    matmul_s = (time.perf_counter() - t) / reps
    if not bool(torch.isfinite(c).all()):
        raise FloatingPointError("the bf16 matrix product gave non-finite values")
    nbytes = (2 << 30) if node.cuda else (64 << 20)
    source = torch.empty(nbytes // 4, device=node.device, dtype=torch.float32).uniform_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(node.device)
    t = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(node.device)
    copy_s = (time.perf_counter() - t) / 10
    return {"matmul_n": n, "matmul_bf16_tflops": 2 * n**3 / matmul_s / 1e12, "copy_bytes": nbytes,
            "copy_tb_per_s_read_plus_write": 2 * nbytes / copy_s / 1e12}


def _engine_row(node, kind: str, shape, batch: int, channels: int = 1) -> dict:
    _cleanup(node.device)
    row = bench_train(node.cfg, shape, batch, steps=node.steps, warmup=node.warmup, ema=True,
                      memory_cap_bytes=node.cap, kind=kind, channels=channels)
    row.pop("kernels_s_per_step", None)
    return row


def train_row(node) -> dict:
    """The training step of the configured diffusion model: the pixel UNet on volumes, or the latent UNet on
    latents of the autoencoder's shape, at `train.micro_batch`."""
    batch = int(node.cfg["train"]["micro_batch"])
    if node.latent:
        channels, *shape = node.latent_shape
        return {"network": "latent UNet", **_engine_row(node, "diffusion", shape, batch, channels)}
    row = _engine_row(node, "diffusion", node.image_shape, batch)
    node.flops = row["flops_per_sample"]
    return {"network": "pixel UNet", **row}


def autoencoder_row(node) -> dict:
    """AutoencoderKL training at `autoencoder.train.micro_batch` (its objective; its discriminator from
    autoencoder.adversarial.start_step, so at first not yet active)."""
    batch = int((node.cfg["autoencoder"].get("train") or {}).get("micro_batch", node.cfg["train"]["micro_batch"]))
    return {"network": "autoencoder", **_engine_row(node, "autoencoder", node.image_shape, batch)}


def tutorial_row(node) -> dict:
    """The MONAI 3D DDPM tutorial's step (fp16 autocast, GradScaler) on the same UNet, shape and batch."""
    batch = int(node.cfg["train"]["micro_batch"])
    if node.flops is None:
        torch.manual_seed(0)
        net = build_model(node.cfg["model"]).to(node.device).train()
        node.flops = flops_per_sample(net, node.image_shape, node.device, node.cuda)
        del net
    _cleanup(node.device)
    row = bench_baseline(node.cfg, node.image_shape, batch, steps=node.steps, device=node.device,
                         warmup=node.warmup, flops=node.flops)
    return {"network": "pixel UNet", "target_shape": list(node.image_shape), **row}


def _set_cap(node, on: bool) -> None:
    if node.cuda and node.cap:
        total = torch.cuda.get_device_properties(node.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, node.cap / total) if on else 1.0, node.device)


def window(node) -> list[int]:
    """decode.roi, or half the latent per axis (rounded up) when the config decodes whole volumes."""
    roi = (node.cfg.get("decode") or {}).get("roi")
    return list(roi) if roi else [max(1, math.ceil(s / 2)) for s in node.latent_shape[1:]]


def _time_decode(node, net, roi) -> dict:
    """Seconds to decode one latent volume (fp32, as sample_part does), after one untimed call."""
    decode_cfg = {"roi": roi, "overlap": 0.25, "sw_batch_size": 1} if roi else None
    z = torch.randn(1, *node.latent_shape, device=node.device)
    reps = 1 if node.plan["tiny"] else 3
    t = time.perf_counter()
    decode_latents(net, z, 1.0, node.image_shape, decode_cfg)  # cuDNN's autotuning
    synchronize(node.device)
    first = time.perf_counter() - t
    reset_peak_memory(node.device)
    t = time.perf_counter()
    for _ in range(reps):
        out = decode_latents(net, z, 1.0, node.image_shape, decode_cfg)
    synchronize(node.device)
    if tuple(out.shape) != (1, 1, *node.image_shape):
        raise RuntimeError(f"decoded shape {tuple(out.shape)}, expected {(1, 1, *node.image_shape)}")
    return {"roi": roi, "first_s": first, "s_per_volume": (time.perf_counter() - t) / reps,
            "peak_memory_bytes": peak_memory(node.device)}


def decode_row(node) -> dict:
    """Decode time per volume, whole and by windows (`window`), fp32, one volume at a time."""
    torch.manual_seed(0)
    net = build_autoencoder(node.cfg["autoencoder"]).to(node.device).eval()
    _set_cap(node, True)
    try:
        _cleanup(node.device)
        row = {"device": device_name(node.device), "precision": "fp32", "batch": 1,
               "latent_shape": list(node.latent_shape), "memory_cap_bytes": node.cap,
               "whole": _time_decode(node, net, None)}
        _cleanup(node.device)
        row["window"] = _time_decode(node, net, window(node))
        return row
    finally:
        _set_cap(node, False)
        _cleanup(node.device)


def _sampling_network(node):
    """The diffusion network with random weights as the sampling stage calls it (compiled on a GPU by default),
    the scheduler config and the noise shape (channels first)."""
    torch.manual_seed(0)
    channels = node.latent_shape[0] if node.latent else 1
    net = build_model(node.cfg["model"], channels=channels).to(node.device).eval()
    performance = resolve_performance(performance_section(node.cfg), node.device)
    data = {"latent_shape": list(node.latent_shape)} if node.latent else {}
    noise_shape = tuple(node.latent_shape) if node.latent else (1, *node.image_shape)
    return fast_model(net, performance), {"data": data, "scheduler": node.cfg["scheduler"]}, noise_shape, performance


def sampling_row(node) -> dict:
    """Seconds per synthetic volume: DDIM with `ddim_steps` over one batch of `sample.batch` volumes (after a
    2-step warm-up of the same batch: compiling, autotuning), plus the decode of each for a latent model."""
    model, config, noise_shape, performance = _sampling_network(node)
    batch, steps = int(node.cfg["sample"]["batch"]), int(node.plan["ddim_steps"])
    seeds = list(range(batch))
    _set_cap(node, True)
    try:
        _cleanup(node.device)
        t = time.perf_counter()
        denoise(model, make_scheduler(config, "ddim", 2), seeds, noise_shape[1:], node.device,
                channels=noise_shape[0], clip=not node.latent)
        synchronize(node.device)
        warmup_s = time.perf_counter() - t
        reset_peak_memory(node.device)
        t = time.perf_counter()
        latents = denoise(model, make_scheduler(config, "ddim", steps), seeds, noise_shape[1:], node.device,
                          channels=noise_shape[0], clip=not node.latent)
        synchronize(node.device)
        seconds = time.perf_counter() - t
        row = {"device": device_name(node.device), "sampler": "ddim", "steps": steps, "batch": batch,
               "compile": performance.compile, "warmup_s": warmup_s, "s_per_batch": seconds,
               "diffusion_s_per_volume": seconds / batch, "s_per_step_per_volume": seconds / batch / steps,
               "peak_memory_bytes": peak_memory(node.device), "memory_cap_bytes": node.cap}
        row["ddpm_s_per_volume_derived"] = row["s_per_step_per_volume"] * int(
            node.cfg["scheduler"].get("num_train_timesteps", 1000))
        row["decode_s_per_volume"] = _decode_batch(node, latents) if node.latent else 0.0
        row["s_per_volume"] = row["diffusion_s_per_volume"] + row["decode_s_per_volume"]
        return row
    finally:
        _set_cap(node, False)
        _cleanup(node.device)


def _decode_batch(node, latents: torch.Tensor) -> float:
    """Seconds per volume to decode `latents` one at a time with the configured decode section, after one
    untimed decode."""
    torch.manual_seed(0)
    net = build_autoencoder(node.cfg["autoencoder"]).to(node.device).eval()
    decode_cfg = node.cfg.get("decode")
    decode_latents(net, latents[:1].to(node.device), 1.0, node.image_shape, decode_cfg)
    synchronize(node.device)
    t = time.perf_counter()
    for z in latents:
        decode_latents(net, z[None].to(node.device), 1.0, node.image_shape, decode_cfg)
    synchronize(node.device)
    return (time.perf_counter() - t) / len(latents)
