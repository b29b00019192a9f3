"""Training throughput through the training loop's own engine: samples/s, MFU and peak memory.

`bench_train` builds the same `Engine` the training loop uses (DeepSpeed, Accelerate or DDP, with the
configured precision), so the figure it prints is the figure of that backend, not of a bare model; it
times any network the workflow trains (training/tasks.py): the diffusion UNet on volumes or on latents,
or the autoencoder with its objective and discriminator. Timing is CUDA-synchronised and excludes
`warmup` steps (cuDNN autotuning, allocator growth).

`bench_baseline` times the MONAI 3D DDPM tutorial's training step as a user copies it (MONAI's
`DiffusionInferer`, `torch.autocast` fp16 with a `GradScaler`, no compile, no cuDNN autotuning, a
`loss.item()` per step) on the same model, shape and batch: the reference the GPU path is compared with.

`bench_levers` times the loop's own step (what `Engine` does for backend "ddp" on one process, plus the
loop's EMA update) with one lever at a time switched: precision, `channels_last_3d`, SDPA/flash
attention in MONAI's attention blocks, `torch.compile`, fused Adam, activation checkpointing. The levers
that the training engine does not carry (fused Adam, activation checkpointing) are applied here, to the
bare UNet, so they can be measured before anyone adds them to it.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from brainddpm.config import autoencoder_training, performance_section
from brainddpm.device import resolve_performance
from brainddpm.models.diffusion import build_model, build_scheduler, diffusion_loss, use_low_precision_norms
from brainddpm.training.engine import Engine, RunPlan, ema_decay_at, ema_update
from brainddpm.training.flops import device_name, flops_per_sample, mfu, peak_memory, reset_peak_memory, synchronize
from brainddpm.training.objectives import AutoencoderObjective, DiffusionObjective, Discriminator
from brainddpm.training.precision import autocast, use_bf16
from brainddpm.training.runtime import scoped_environment, setup_runtime
from brainddpm.training.tasks import autoencoder_flops, autoencoder_parts

KINDS = ("diffusion", "autoencoder")


def bench_train(cfg: dict, target_shape, batch: int, steps: int, warmup: int = 3, ema: bool = False,
                memory_cap_bytes: int | None = None, profile_steps: int = 0, kind: str = "diffusion",
                channels: int = 1) -> dict:
    """Time `steps` optimizer steps of `batch` random volumes after `warmup` untimed ones, in this process.

    `cfg` needs the model, scheduler, train and launch sections (and autoencoder for that kind); train.backend
    and train.precision pick the engine and precision exactly as in training (gradient accumulation 1,
    micro-batch `batch`), and the `performance` section (compile, channels-last, bf16 GroupNorm) as training
    resolves it for the device. `ema`: also update an fp32 EMA of the weights after each step, as the
    training loop does.
    `kind`: "diffusion", the UNet on inputs of `channels` channels (1 for volumes; the autoencoder's latent
    channels for a latent model, `target_shape` then being the latent's), or "autoencoder", AutoencoderKL
    with the training loop's objective (whole volumes padded to autoencoder.pad_multiple, or patches) and
    its discriminator when autoencoder.adversarial.weight > 0, active from its start_step; `cfg["train"]`
    is then overlaid with autoencoder.train, as the autoencoder's training run sees it. The perceptual loss
    is left out: its weights are never downloaded by a job.
    `memory_cap_bytes`: on a GPU, allow this process no more device memory than that
    (`torch.cuda.set_per_process_memory_fraction`), e.g. a LEONARDO A100's 64 GB on a larger GPU.
    The warm-up steps carry cuDNN's autotuning and the compilation: their time is `warmup_s`.
    `profile_steps`: after the timed steps, run this many more under torch.profiler and return the device
    time per step of each kernel (`kernels_s_per_step`), for the same compiled engine.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    cfg = autoencoder_training(cfg) if kind == "autoencoder" else cfg
    train_cfg = {**cfg["train"], "micro_batch": batch, "grad_accum": 1}
    with scoped_environment():
        runtime = setup_runtime(train_cfg["backend"], cfg["launch"]["gpus_per_node"],
                                cfg["launch"]["collective_timeout_s"])
        device = runtime.device
        performance = resolve_performance(performance_section(cfg), device)
        if memory_cap_bytes and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_bytes / total), device)
        plan = RunPlan(batch, 1, 1, steps, warmup + steps, use_bf16(train_cfg["precision"], device))
        network = _network(kind, cfg, target_shape, channels, runtime, plan.bf16)
        net = network.net
        engine = Engine(train_cfg, plan, runtime, net, network.objective, performance)
        x = torch.rand(batch, network.channels, *target_shape, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        averaged = {k: v.detach().clone().float() for k, v in net.state_dict().items()} if ema else None
        checksum = _checksum(net)
        try:
            timing = _time_engine(engine, net, x, generator, warmup, steps, averaged, cfg["train"]["ema_decay"],
                                  device)
            kernels = _profile(lambda: engine.micro_step(x, generator, boundary=True, step=warmup + steps),
                               device, profile_steps) if profile_steps else None
            checksum = _checksum(net) - checksum
        finally:
            engine.close()
            if memory_cap_bytes and device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            if performance.compile:
                torch._dynamo.reset()
            if runtime.owns_group and runtime.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
    samples_per_s = steps * batch / timing["elapsed_s"]
    flops = network.flops
    return {
        "device": device_name(device), "backend": train_cfg["backend"], "precision": plan.precision,
        "kind": kind, "channels": network.channels,
        "performance": {k: v for k, v in asdict(performance).items() if k != "compile_backend"},
        "memory_cap_bytes": memory_cap_bytes, "warmup_steps": warmup, "warmup_s": timing["warmup_s"],
        "batch": batch, "steps": steps, "target_shape": list(target_shape),
        "parameters": sum(p.numel() for p in net.parameters()),
        "discriminator_parameters": network.discriminator_parameters, "steps_per_s": steps / timing["elapsed_s"],
        "samples_per_s": samples_per_s, "flops_per_sample": flops, "tflops_per_s": flops * samples_per_s / 1e12,
        "mfu": mfu(flops, samples_per_s, device, plan.precision), "peak_memory_bytes": timing["peak_memory_bytes"],
        "final_loss": timing["final_loss"], "weight_checksum_change": checksum, "ema": ema,
        "kernels_s_per_step": kernels,
    }


def _time_engine(engine: Engine, net: torch.nn.Module, x: torch.Tensor, generator: torch.Generator, warmup: int,
                 steps: int, averaged: dict | None, ema_decay: float, device: torch.device) -> dict:
    """`warmup` untimed then `steps` timed optimizer steps of `engine` on batch `x` (CUDA-synchronised), with
    the EMA update of `net` after each when `averaged`: elapsed and warm-up seconds, peak memory of the timed steps,
    the last loss."""
    t0, t_first = 0.0, time.perf_counter()
    warmup_s = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            warmup_s = time.perf_counter() - t_first
            reset_peak_memory(device)
            t0 = time.perf_counter()
        loss = engine.micro_step(x, generator, boundary=True, step=i)
        if averaged is not None:
            ema_update(averaged, net, ema_decay_at(i, ema_decay))
    synchronize(device)
    return {"elapsed_s": time.perf_counter() - t0, "warmup_s": warmup_s, "peak_memory_bytes": peak_memory(device),
            "final_loss": float(loss)}


@dataclass(frozen=True)
class BenchNetwork:
    net: torch.nn.Module
    objective: DiffusionObjective | AutoencoderObjective
    discriminator: Discriminator | None
    flops: int | None
    channels: int

    @property
    def discriminator_parameters(self) -> int:
        return sum(p.numel() for p in self.discriminator.net.parameters()) if self.discriminator is not None else 0


def _network(kind: str, cfg: dict, target_shape, channels: int, runtime, bf16: bool) -> BenchNetwork:
    """The network `kind` as training/tasks.py builds it, its objective, discriminator and FLOPs per sample
    (one forward and backward, counted the way the training loop counts them for its MFU)."""
    device = runtime.device
    torch.manual_seed(0)
    if kind == "diffusion":
        net = build_model(cfg["model"], channels=channels).to(device).train()
        scheduler = build_scheduler(cfg["scheduler"])
        flops = flops_per_sample(net, target_shape, device, bf16, scheduler.num_train_timesteps, channels=channels)
        return BenchNetwork(net, DiffusionObjective(scheduler), None, flops, channels)
    net, objective, discriminator = autoencoder_parts(cfg["autoencoder"], cfg["train"], runtime, bf16, 1,
                                                      perceptual=False)
    flops = autoencoder_flops(net, objective, cfg["autoencoder"], target_shape, device, bf16)
    return BenchNetwork(net, objective, discriminator, flops, 1)


@torch.no_grad()
def _checksum(net: torch.nn.Module) -> float:
    """Sum of all weights in float64: its change over the whole bench (warm-up, timed and profiled steps) shows
    the optimizer really stepped. Under ZeRO-3 this process holds only its partition: read 0 there."""
    return float(sum(p.detach().double().sum() for p in net.parameters()))


def _profile(step, device: torch.device, steps: int) -> dict[str, float]:
    """Device seconds per step of each kernel over `steps` profiled calls of `step()`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda" and "CUDA" not in str(getattr(event, "device_type", "")):
            continue
        us = getattr(event, "self_device_time_total", None)
        if us is None or device.type != "cuda":
            us = getattr(event, "self_cpu_time_total", 0)
        kernels[event.key] = kernels.get(event.key, 0.0) + us / 1e6 / steps
    return kernels


# ---- the MONAI tutorial's step (the baseline) and the levers, on the bare UNet -----------------------------


def _timed(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Run `step()` warmup + steps times; time the last `steps` (CUDA-synchronised, per step and in all)."""
    step_s = []
    t_first = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - t_first
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        synchronize(device)
        step_s.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "warmup_s": warmup_s, "step_s_median": statistics.median(step_s),
            "step_s_min": min(step_s), "step_s_max": max(step_s)}


def _result(name: str, device, batch: int, steps: int, timing: dict, flops: int | None, precision: str,
            mem_before: int, **extra) -> dict:
    samples_per_s = steps * batch / timing["elapsed_s"]
    peak = peak_memory(device)
    return {"variant": name, "device": device_name(device), "batch": batch, "steps": steps, **timing,
            "samples_per_s": samples_per_s, "flops_per_sample": flops,
            "tflops_per_s": flops * samples_per_s / 1e12 if flops else None,
            "mfu": mfu(flops, samples_per_s, device, "bf16"),  # all rows against the bf16 peak: comparable
            "mfu_own_precision": mfu(flops, samples_per_s, device, precision), "precision": precision,
            "peak_memory_bytes": peak, "peak_memory_above_start_bytes": peak - mem_before
            if device.type == "cuda" else None, **extra}


def _cleanup(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return 0


def bench_baseline(cfg: dict, target_shape, batch: int, steps: int, device: torch.device, warmup: int = 3,
                   amp: bool = True, flash: bool = False, cudnn_benchmark: bool = False,
                   flops: int | None = None) -> dict:
    """The MONAI 3D DDPM tutorial's training step, as a user copies it, on the configured UNet.

    Tutorial (Project-MONAI/tutorials, generation/3d_ddpm): `DiffusionInferer(scheduler)`, Adam at 5e-5,
    `GradScaler("cuda")`, `with autocast(device_type="cuda", enabled=use_amp)` (fp16 on CUDA) around the noise,
    timesteps, `inferer(...)` and the MSE, `scaler.scale(loss).backward()`, `scaler.step`, `scaler.update`,
    `loss.item()` every step; no gradient clipping, no EMA, no compile, no cuDNN autotuning, and
    `use_flash_attention` left at MONAI's default (False) unless `flash`. `amp=False` is the tutorial as it
    ships (use_amp = False: fp32, TF32 convolutions by PyTorch's default).
    """
    from monai.inferers import DiffusionInferer
    from torch.amp import GradScaler

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    mem_before = _cleanup(device)
    try:
        torch.manual_seed(0)
        model = build_model({**cfg["model"], "use_flash_attention": flash}).to(device).train()
        scheduler = build_scheduler(cfg["scheduler"])
        inferer = DiffusionInferer(scheduler)
        optimizer = torch.optim.Adam(params=model.parameters(), lr=5e-5)
        scaler = GradScaler(device.type)
        images = torch.rand(batch, 1, *target_shape, device=device)
        losses = []

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                noise = torch.randn_like(images).to(device)
                timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],),
                                          device=images.device).long()
                noise_pred = inferer(inputs=images, diffusion_model=model, noise=noise, timesteps=timesteps)
                loss = F.mse_loss(noise_pred.float(), noise.float())
            if amp:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.item())

        timing = _timed(step, device, warmup, steps)
        dtype = (torch.get_autocast_dtype(device.type) if hasattr(torch, "get_autocast_dtype")
                 else torch.float16) if amp else None
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        name = f"MONAI tutorial step ({precision}{', GradScaler' if amp else ''}" \
               f"{', flash attention' if flash else ''}{', cudnn.benchmark' if cudnn_benchmark else ''})"
        return _result(name, device, batch, steps, timing, flops, "bf16" if amp else "fp32", mem_before,
                       final_loss=losses[-1], autocast_dtype=precision, flash=flash, cudnn_benchmark=cudnn_benchmark)
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass(frozen=True)
class Levers:
    """One configuration of the loop's step. The defaults are the loop's eager step (models/diffusion.py,
    training/engine.py)."""
    precision: str = "bf16"  # "bf16" (autocast over fp32 weights) or "fp32" (TF32 convolutions, PyTorch's default)
    channels_last: bool = False  # model and input in torch.channels_last_3d
    flash: bool = True  # use_flash_attention: SDPA in MONAI's attention blocks (the reference config's value)
    compile: bool = False  # torch.compile of the UNet
    compile_mode: str = "default"  # or "max-autotune-no-cudagraphs"
    low_precision_norm: bool = False  # GroupNorm in bf16 under bf16 autocast (models/diffusion.py)
    fused_adam: bool = False  # torch.optim.Adam(fused=True) instead of the foreach default
    checkpointing: bool = False  # activation checkpointing of every down, middle and up block
    ema: bool = True  # the loop's EMA update after each step
    cudnn_benchmark: bool = True  # what setup_runtime sets on GPUs

    def label(self) -> str:
        on = [self.precision]
        on += ["channels_last_3d"] if self.channels_last else []
        on += [] if self.flash else ["math attention"]
        on += [f"torch.compile ({self.compile_mode})"] if self.compile else []
        on += ["bf16 GroupNorm"] if self.low_precision_norm else []
        on += ["fused Adam"] if self.fused_adam else []
        on += ["activation checkpointing"] if self.checkpointing else []
        on += [] if self.ema else ["no EMA"]
        on += [] if self.cudnn_benchmark else ["no cudnn.benchmark"]
        return ", ".join(on)


def apply_checkpointing(net: torch.nn.Module) -> torch.nn.Module:
    """Recompute each down, middle and up block of a DiffusionModelUNet in the backward pass (in place).

    Only the blocks' inputs are kept between forward and backward; each block's forward runs twice.
    Non-reentrant checkpointing keeps the autocast state and accepts the blocks' keyword arguments.
    """
    from torch.utils.checkpoint import checkpoint

    def wrap(block: torch.nn.Module) -> None:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward

    for block in [*net.down_blocks, net.middle_block, *net.up_blocks]:
        wrap(block)
    return net


def build_step(cfg: dict, target_shape, batch: int, device: torch.device, levers: Levers):
    """The loop's step with `levers`: returns (step function, the bare UNet, the optimizer, the model called)."""
    torch.manual_seed(0)
    net = build_model({**cfg["model"], "use_flash_attention": levers.flash}).to(device).train()
    fmt = torch.channels_last_3d if levers.channels_last else torch.contiguous_format
    if levers.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if levers.low_precision_norm:
        use_low_precision_norms(net)
    if levers.checkpointing:
        apply_checkpointing(net)
    compile_kwargs = {} if levers.compile_mode == "default" else {"mode": levers.compile_mode}
    model = torch.compile(net, **compile_kwargs) if levers.compile else net
    train_cfg = cfg["train"]
    optimizer = torch.optim.Adam(net.parameters(), lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                                 weight_decay=train_cfg["weight_decay"],
                                 **({"fused": True} if levers.fused_adam else {}))
    scheduler = build_scheduler(cfg["scheduler"])
    bf16 = levers.precision == "bf16"
    x = torch.rand(batch, 1, *target_shape, device=device).contiguous(memory_format=fmt)
    generator = torch.Generator(device=device).manual_seed(0)
    ema = {k: v.detach().clone().float() for k, v in net.state_dict().items()} if levers.ema else None
    grad_clip = train_cfg["grad_clip"]
    state = {"step": 0, "loss": None}

    def step(batch_x: torch.Tensor | None = None):
        xb = x if batch_x is None else batch_x.contiguous(memory_format=fmt)
        with autocast(device, bf16):
            loss = diffusion_loss(model, scheduler, xb, generator)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, net, ema_decay_at(state["step"], train_cfg["ema_decay"]))
        state["step"] += 1
        state["loss"] = loss.detach()

    return step, net, optimizer, state


def bench_levers(cfg: dict, target_shape, batch: int, steps: int, device: torch.device, levers: Levers = Levers(),
                 warmup: int = 3, flops: int | None = None) -> dict:
    """samples/s, MFU and peak memory of the loop's step with `levers` (one process, random volumes).

    The warm-up steps carry cuDNN's autotuning and, with `compile`, the compilation: their time is
    reported as `warmup_s`, never in the rate.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = levers.cudnn_benchmark and device.type == "cuda"
    mem_before = _cleanup(device)
    try:
        step, net, _, state = build_step(cfg, target_shape, batch, device, levers)
        timing = _timed(step, device, warmup, steps)
        return _result(levers.label(), device, batch, steps, timing, flops, levers.precision, mem_before,
                       levers=asdict(levers), final_loss=float(state["loss"]),
                       parameters=sum(p.numel() for p in net.parameters()))
    finally:
        torch.backends.cudnn.benchmark = previous
        if levers.compile:
            torch._dynamo.reset()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()

