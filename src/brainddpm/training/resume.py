"""Around the loop: restoring a checkpoint (and refusing one from another run), stopping for a requeue, and
writing the run's outputs at the end (model.safetensors, loss.csv/png, train.json).

Resume is exact: the data order is a DistributedSampler permutation per epoch, and a resumed run skips
the micro-batches already done in its epoch; the noise and timesteps come from a per-rank generator
whose state is checkpointed with everything else (checkpoint.py). Exact means bit-for-bit on the CPU;
on GPUs cuDNN's autotuned kernels make it exact up to float non-determinism. On the preemption signal
(SIGUSR2, sent by SLURM or submitit before the time limit) every rank stops at the next step boundary,
the run checkpoints, and submitit's handler requeues the job (launch.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from brainddpm.config import is_conditioned
from brainddpm.errors import CheckpointError
from brainddpm.fileio import atomic_path
from brainddpm.models.final import save_final
from brainddpm.training import checkpoint as ckpt
from brainddpm.training.engine import Engine
from brainddpm.training.perf import device_name, mfu, peak_memory
from brainddpm.training.progress import plot_loss
from brainddpm.training.runtime import Runtime, StopSignal, TrainingInterrupted

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What changes as the run goes: restored from a checkpoint on resume."""
    step: int = 0
    wall_before_s: float = 0.0  # training time of earlier jobs of this run
    resumed_from: int | None = None
    last_loss: float | None = None



# train.* keys that change the result: a checkpoint made with other values is not resumed
RESULT_KEYS = ("lr", "betas", "weight_decay", "ema_decay", "grad_clip", "backend", "precision")


def restore_checkpoint(path: Path, cfg: dict, runtime: Runtime, engine: Engine, ema: dict[str, torch.Tensor],
                       generator: torch.Generator, index_sha: str, progress: Progress,
                       sections: tuple[str, ...] = ("model", "scheduler", "seed")) -> None:
    """Load a checkpoint into the model, EMA, optimizer (and discriminator), this rank's RNGs and `progress`.

    Only the budget (epochs, max_steps) and bookkeeping may change between a checkpoint and its resume:
    another model (the config `sections` of the task), schedule, seed, optimiser setting or training set would
    silently mix two runs.
    """
    meta = ckpt.read_meta(path)
    old = meta["config"]
    changed = [s for s in sections if _section(old, s) != _section(cfg, s)]
    if old.get("condition") != cfg.get("condition") and (is_conditioned(old) or is_conditioned(cfg)):
        changed.append("condition")
    changed += [f"train.{k}" for k in RESULT_KEYS if old["train"][k] != cfg["train"][k]]
    if meta.get("train_index_sha256", index_sha) != index_sha:
        changed.append("the training shards (index.json)")
    if changed:
        raise CheckpointError(f"{path} was trained with a different {', '.join(changed)}; use another run "
                                   f"name, or delete {path.parent} to start afresh")
    partitioned = ckpt.is_partitioned(engine.optimizer)
    if partitioned and meta["world_size"] != runtime.world_size:
        raise CheckpointError(f"{path} holds ZeRO-{meta['zero_stage']} optimizer state partitioned over "
                                   f"{meta['world_size']} processes; this run has {runtime.world_size}: resume "
                                   f"with {meta['world_size']}")
    if meta["world_size"] != runtime.world_size or any(old["train"][k] != cfg["train"][k]
                                                       for k in ("micro_batch", "grad_accum")):
        log.warning("resuming %s with another number of processes or batch layout: the data order and noise "
                    "differ from an uninterrupted run", path)
    state = ckpt.load_file(path / "model.pt")
    engine.net.load_state_dict(state["model"])
    for k, v in state["ema"].items():
        ema[k].copy_(v)
    optimizer_file = ckpt.rank_file("optimizer", runtime.rank) if partitioned else "optimizer.pt"
    ckpt.load_optimizer_state(engine.optimizer, ckpt.load_file(path / optimizer_file))
    if engine.discriminator is not None:
        if not (path / "discriminator.pt").exists():
            raise CheckpointError(f"{path} holds no discriminator: it was trained without the adversarial loss")
        engine.discriminator.load_state_dict(ckpt.load_file(path / "discriminator.pt"))
    rng_file = path / ckpt.rank_file("rng", runtime.rank)
    if rng_file.exists():
        ckpt.set_rng_state(ckpt.load_file(rng_file), generator)
    if runtime.rank == 0:
        log.info("resumed from %s (step %d)", path, meta["step"])
    progress.step = progress.resumed_from = meta["step"]
    progress.wall_before_s, progress.last_loss = meta["wall_time_s"], meta.get("final_loss")


def _section(cfg: dict, name: str):
    """A config section as resuming compares it. The autoencoder's: without its `train` overrides (compared as
    train.*), without `use_checkpoint` (memory, not results: switching it on after running out of memory must
    resume), and a loss switched off (weight 0) compares equal whatever its other keys say."""
    value = cfg.get(name)
    if name == "autoencoder" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("train", "use_checkpoint")}
        for loss in ("adversarial", "perceptual"):
            if isinstance(value.get(loss), dict) and not value[loss].get("weight"):
                value[loss] = {"weight": 0}
    return value


def stop_after_checkpoint(stop: StopSignal, runtime: Runtime, step: int, ckpt_root: Path) -> None:
    """After the stop checkpoint: hand over to submitit (rank 0 requeues and exits), or raise."""
    log.warning("rank %d: preemption signal; checkpoint saved at step %d", runtime.rank, step)
    # inside submitit, the previous handler is submitit's: on rank 0 it requeues and exits (or raises when
    # out of requeues); on the other ranks it returns, and they leave quietly
    if stop.forward() and runtime.rank != 0 and os.environ.get("SUBMITIT_EXECUTOR"):
        raise SystemExit(0)
    raise TrainingInterrupted(f"training stopped by signal at step {step}; the checkpoint in {ckpt_root} "
                              "lets a rerun resume")


def rank_digests(net: torch.nn.Module, runtime: Runtime, what: str) -> list[str]:
    """Every rank's sha256 of `net`'s weights (logged as an error when they differ: the ranks drifted apart)."""
    digests = [weights_digest(net)]
    if runtime.world_size > 1:
        digests = [None] * runtime.world_size
        dist.all_gather_object(digests, weights_digest(net))
        if len(set(digests)) > 1:
            log.error("the %s weights differ between ranks at the end of training: %s", what, digests)
    return digests


def write_outputs(cfg: dict, out_dir: Path, runtime: Runtime, net: torch.nn.Module, ema: dict[str, torch.Tensor],
                  summary: dict, output: str, final_config: Callable[[dict], dict],
                  discriminator: torch.nn.Module | None = None) -> dict:
    """Write the final weights (`output`, with `final_config(ema)` as their config), loss.png and train.json
    (rank 0); return train.json's content, with every rank's weight digest (and the discriminator's)."""
    digests = rank_digests(net, runtime, "model")
    if discriminator is not None:
        summary = {**summary, "discriminator_sha256": rank_digests(discriminator, runtime, "discriminator")}
    cuda = runtime.device.type == "cuda"
    summary = {
        **summary, "gpu_hours": summary["wall_time_s"] * runtime.world_size / 3600 if cuda else 0.0,
        "peak_memory_bytes": peak_memory(runtime.device), "world_size": runtime.world_size,
        "device": device_name(runtime.device),
        "mfu": mfu(summary["flops_per_sample"], summary["samples_per_s"], runtime.device, summary["precision"]),
        "requeues": ckpt.read_requeues(out_dir)["total"], "backend": cfg["train"]["backend"],
        "weights_sha256": digests,
    }
    if runtime.rank == 0:
        save_final(out_dir / output, ema, final_config(ema), summary["steps"])
        with atomic_path(out_dir / "loss.csv") as tmp:
            shutil.copyfile(out_dir / "checkpoints" / "loss.csv", tmp)
        plot_loss(out_dir / "loss.csv", out_dir / "loss.png")
        with atomic_path(out_dir / "train.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, outputs in %s", summary["steps"], summary["final_loss"], out_dir)
    runtime.barrier()
    return summary


def weights_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
