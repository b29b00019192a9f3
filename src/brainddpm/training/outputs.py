"""The run's outputs, written in one place at the end of training: the final weights (the task's file:
model.safetensors or autoencoder.safetensors, EMA weights), loss.csv and loss.png, and train.json, whose
content (`run_summary`) is built here once, with every rank's weight digests. Also the requeue counter
(requeues.json), which launch.py increments and train.json reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from brainddpm.fileio import atomic_path
from brainddpm.models.final import save_final
from brainddpm.training.checkpoint import TrainState
from brainddpm.training.engine import RunPlan
from brainddpm.training.flops import device_name, peak_memory
from brainddpm.training.losslog import StepLog, loss_log_path, plot_loss
from brainddpm.training.runtime import Runtime
from brainddpm.training.tasks import Task

log = logging.getLogger(__name__)


def write_outputs(cfg: dict, out_dir: Path, runtime: Runtime, plan: RunPlan, task: Task, state: TrainState,
                  steps: StepLog) -> dict:
    """Write the final weights (with `task.final_config(ema)` as their config), loss.csv, loss.png and train.json
    (rank 0); return train.json's content. Every rank calls it (the digests are gathered)."""
    summary = run_summary(cfg, out_dir, runtime, plan, task, state, steps)
    if runtime.rank == 0:
        save_final(out_dir / task.output, state.ema, task.final_config(state.ema), summary["steps"])
        with atomic_path(out_dir / "loss.csv") as tmp:
            shutil.copyfile(loss_log_path(out_dir), tmp)
        plot_loss(out_dir / "loss.csv", out_dir / "loss.png")
        with atomic_path(out_dir / "train.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, outputs in %s", summary["steps"], summary["final_loss"], out_dir)
    runtime.barrier()
    return summary


def run_summary(cfg: dict, out_dir: Path, runtime: Runtime, plan: RunPlan, task: Task, state: TrainState,
                steps: StepLog) -> dict:
    """train.json's content: the run's length, loss, speed (MFU from the loss log's timing), device, and every
    rank's weight digest (and the discriminator's)."""
    wall_time_s = state.wall_time_s()
    summary = {
        "epochs": state.step / plan.steps_per_epoch, "steps": state.step, "wall_time_s": wall_time_s,
        "final_loss": steps.final_loss if steps.final_loss is not None else state.last_loss,
        "samples_per_s": steps.samples_per_s, "resumed_from_step": state.resumed_from,
        "flops_per_sample": task.flops, "precision": plan.precision, "kind": task.kind,
    }
    if task.base is not None:  # a fine-tuning run (finetune.py): its base, and how much of it stayed fixed
        summary["base"] = task.base.provenance()
        summary["frozen"] = {"prefixes": cfg["finetune"]["freeze"],
                             "parameters": sum(p.numel() for p in task.net.parameters() if not p.requires_grad)}
    digests = rank_digests(task.net, runtime, "model")
    if state.discriminator is not None:
        summary["discriminator_sha256"] = rank_digests(state.discriminator.net, runtime, "discriminator")
    cuda = runtime.device.type == "cuda"
    summary.update({
        "gpu_hours": wall_time_s * runtime.world_size / 3600 if cuda else 0.0,
        "peak_memory_bytes": peak_memory(runtime.device), "world_size": runtime.world_size,
        "device": device_name(runtime.device), "mfu": steps.mfu, "requeues": read_requeues(out_dir)["total"],
        "backend": cfg["train"]["backend"], "weights_sha256": digests,
    })
    return summary


def rank_digests(net: torch.nn.Module, runtime: Runtime, what: str) -> list[str]:
    """Every rank's sha256 of `net`'s weights (logged as an error when they differ: the ranks drifted apart)."""
    digests = [weights_digest(net)]
    if runtime.world_size > 1:
        digests = [None] * runtime.world_size
        dist.all_gather_object(digests, weights_digest(net))
        if len(set(digests)) > 1:
            log.error("the %s weights differ between ranks at the end of training: %s", what, digests)
    return digests


def weights_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- requeue counter, shared by launch (which increments it) and train.json (which reports it) ----

REQUEUES = "requeues.json"


def read_requeues(out_dir: Path) -> dict:
    """{"total": requeues over the run's life, "submission": requeues since the last submission}."""
    try:
        return json.loads((Path(out_dir) / REQUEUES).read_text())
    except (FileNotFoundError, ValueError):
        return {"total": 0, "submission": 0}


def write_requeues(out_dir: Path, counts: dict) -> None:
    with atomic_path(Path(out_dir) / REQUEUES) as tmp:
        tmp.write_text(json.dumps(counts))
