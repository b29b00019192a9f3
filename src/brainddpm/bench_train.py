"""Training throughput through the training loop's own engine: samples/s, MFU and peak memory.

`bench_train` builds the same `Engine` the training loop uses (DeepSpeed, Accelerate or DDP, with the
configured precision), so the figure it prints is the figure of that backend, not of a bare model.
Timing is CUDA-synchronised and excludes `warmup` steps (cuDNN autotuning, allocator growth).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .model import build_model, build_scheduler
from .perf import device_name, flops_per_sample, mfu, peak_memory, reset_peak_memory, synchronize, use_bf16
from .runtime import scoped_environment, setup_runtime
from .train import Engine, RunPlan


def bench_train(cfg: dict, target_shape, batch: int, steps: int, warmup: int = 3) -> dict:
    """Time `steps` optimizer steps of `batch` random volumes after `warmup` untimed ones, in this process.

    `cfg` needs the model, scheduler, train and launch sections; train.backend and train.precision pick
    the engine and precision exactly as in training (gradient accumulation 1, micro-batch `batch`).
    """
    train_cfg = {**cfg["train"], "micro_batch": batch, "grad_accum": 1}
    with scoped_environment():
        runtime = setup_runtime(train_cfg["backend"], cfg["launch"]["gpus_per_node"],
                                cfg["launch"]["collective_timeout_s"])
        device = runtime.device
        torch.manual_seed(0)
        net = build_model(cfg["model"]).to(device).train()
        scheduler = build_scheduler(cfg["scheduler"])
        plan = RunPlan(batch, 1, 1, steps, warmup + steps, use_bf16(train_cfg["precision"], device))
        flops = flops_per_sample(net, target_shape, device, plan.bf16, scheduler.num_train_timesteps)
        engine = Engine(train_cfg, plan, runtime, net, scheduler)
        x = torch.rand(batch, 1, *target_shape, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        try:
            t0 = 0.0
            for i in range(warmup + steps):
                if i == warmup:
                    synchronize(device)
                    reset_peak_memory(device)
                    t0 = time.perf_counter()
                loss = engine.micro_step(x, generator, boundary=True)
            synchronize(device)
            elapsed = time.perf_counter() - t0
        finally:
            engine.close()
            if runtime.owns_group and runtime.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
    samples_per_s = steps * batch / elapsed
    return {
        "device": device_name(device), "backend": train_cfg["backend"], "precision": plan.precision,
        "batch": batch, "steps": steps, "target_shape": list(target_shape),
        "parameters": sum(p.numel() for p in net.parameters()), "steps_per_s": steps / elapsed,
        "samples_per_s": samples_per_s, "flops_per_sample": flops, "tflops_per_s": flops * samples_per_s / 1e12,
        "mfu": mfu(flops, samples_per_s, device, plan.precision), "peak_memory_bytes": peak_memory(device),
        "final_loss": float(loss),
    }
