"""The training loop: one code path for one process and for N processes (one per GPU), and for every model
the workflow trains (the diffusion UNet, pixel or latent, and the autoencoder: tasks.py).

Every process runs `train(cfg, shards_dir, out_dir, kind)`. The rendezvous comes from the environment
(runtime.py); without it the run is a single process. Per optimizer step: `grad_accum` micro-batches
of `micro_batch` volumes per process, the task's objective (objectives.py: for the DDPM the
noise-prediction MSE, always computed in fp32), Adam, gradient clipping, then an EMA of the weights with
warm-up (`ema_decay_at`). The backend, precision and compilation sit behind `Engine` (engine.py); the run's
state is saved, restored and refused by the `Checkpointer` (checkpoint.py, where exact resume is explained);
stopping for a requeue is runtime.py's; the loss log is losslog.py's; the outputs are written by outputs.py.

The learning rate is used as given, whatever the global batch (processes x micro_batch x grad_accum):
with more GPUs each step averages more volumes, and the epoch has fewer steps. Scale train.lr yourself
if you change the global batch a lot (Adam: roughly with its square root).

Outputs in out_dir: model.safetensors (the autoencoder's: autoencoder.safetensors; EMA weights), loss.csv,
loss.png, train.json, checkpoints/.
The running loss log lives in checkpoints/loss.csv (Snakemake deletes a rule's outputs before a rerun;
the history must survive that) and is copied to loss.csv at the end.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from brainddpm.config import performance_section, validate_config
from brainddpm.data.dataset import ShardDataset
from brainddpm.data.shards import data_description, training_split
from brainddpm.device import resolve_performance
from brainddpm.fileio import sha256_file
from brainddpm.training.checkpoint import Checkpointer, TrainState
from brainddpm.training.engine import Engine, RunPlan, ema_decay_at, ema_update, plan_run
from brainddpm.training.flops import device_name, mfu, peak_memory
from brainddpm.training.losslog import StepLog, loss_log_path
from brainddpm.training.outputs import write_outputs
from brainddpm.training.runtime import (
    Runtime,
    StopSignal,
    leave_process_group,
    scoped_environment,
    setup_logging,
    setup_runtime,
    stop_after_checkpoint,
)
from brainddpm.training.tasks import Task, build_task, check_kind

log = logging.getLogger(__name__)


def train(cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> dict:
    """Train (or resume training) the `kind` of model (tasks.py) in this process; returns train.json's content."""
    check_kind(kind)
    validate_config(cfg, partial=True)
    setup_logging()
    train_cfg, out_dir = cfg["train"], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scoped_environment(), ExitStack() as cleanup:
        runtime = setup_runtime(train_cfg["backend"], cfg["launch"]["gpus_per_node"],
                                cfg["launch"]["collective_timeout_s"])
        cleanup.push(lambda kind, *_: leave_process_group(runtime, succeeded=kind is None))
        stop = StopSignal()
        cleanup.callback(stop.restore)
        started_at, split = time.time(), training_split(shards_dir)
        dataset = ShardDataset(split, verify=train_cfg["verify_checksums"], cache=train_cfg["cache_in_memory"])
        plan = plan_run(train_cfg, len(dataset), runtime)
        task = build_task(kind, cfg, dataset, split, data_description(split), runtime, plan)
        engine = Engine(train_cfg, plan, runtime, task.net, task.objective,
                        resolve_performance(performance_section(cfg), runtime.device))
        cleanup.callback(engine.close)
        checkpointer = Checkpointer(out_dir / "checkpoints", cfg, kind, runtime, plan,
                                    sha256_file(split / "index.json"), task.compared_sections,
                                    task.base.sha256 if task.base else None)
        state = checkpointer.restore(start_state(cfg["seed"], runtime, task, engine, started_at))
        log_start(cfg, kind, runtime, plan, state.step)
        sampler, order, loader = data_order(dataset, plan, runtime, cfg["seed"], train_cfg["num_workers"])
        stop.install()
        steps = StepLog(loss_log_path(out_dir), plan.total_steps, state.step, plan.steps_per_epoch,
                        plan.samples_per_process_step, train_cfg["lr"], train_cfg["log_every"],
                        write=runtime.rank == 0, mfu=partial(mfu, task.flops, device=runtime.device,
                                                             precision=plan.precision))
        while state.step < plan.total_steps:
            epoch = state.step // plan.steps_per_epoch
            sampler.set_epoch(epoch)
            done_in_epoch = (state.step % plan.steps_per_epoch) * plan.samples_per_process_step
            order.indices = list(sampler)[done_in_epoch:plan.steps_per_epoch * plan.samples_per_process_step]
            loss_sum, t_prev = 0.0, time.perf_counter()
            for i, (x, context) in enumerate(loader):
                boundary = (i + 1) % plan.gradient_accumulation_steps == 0
                context = context.to(runtime.device, non_blocking=True) if task.encoding else None
                loss_sum = loss_sum + engine.micro_step(x.to(runtime.device, non_blocking=True), state.generator,
                                                        boundary, context, state.step)
                if not boundary:
                    continue
                ema_update(state.ema, task.net, ema_decay_at(state.step, train_cfg["ema_decay"]))
                state.step += 1
                loss, stop_now = mean_loss_and_stop(loss_sum, stop.flag, plan, runtime)
                loss_sum, state.last_loss = 0.0, loss
                steps.step(state.step, epoch, loss, time.perf_counter() - t_prev)
                if state.step % train_cfg["checkpoint_every"] == 0 or state.step == plan.total_steps or stop_now:
                    checkpointer.save(state)
                if stop_now:
                    steps.close()
                    stop_after_checkpoint(stop, runtime, state.step, checkpointer.root)
                if state.step >= plan.total_steps:
                    break
                t_prev = time.perf_counter()  # checkpointing and logging are not timed
            steps.end_epoch(epoch, peak_memory(runtime.device))
        steps.close()
        stop.restore()
        return write_outputs(cfg, out_dir, runtime, plan, task, state, steps)


class EpochOrder(Sampler[int]):
    """The dataset indices this process reads in the current pass, set before each pass.

    One DataLoader (with persistent workers) serves the whole run; only the order changes per epoch.
    """

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def start_state(seed: int, runtime: Runtime, task: Task, engine: Engine, started_at: float) -> TrainState:
    """The state before the first step: the EMA starts at the initial weights; each rank seeds its RNGs."""
    ema = {k: v.detach().clone().float() for k, v in task.net.state_dict().items()}
    random.seed(seed + runtime.rank)
    np.random.seed(seed + runtime.rank)
    torch.manual_seed(seed + runtime.rank)
    generator = torch.Generator(device=runtime.device).manual_seed(seed * 1000 + runtime.rank)  # noise, timesteps
    return TrainState(task.net, ema, generator, engine.optimizer, task.discriminator, started_at=started_at)


def data_order(dataset: ShardDataset, plan: RunPlan, runtime: Runtime, seed: int,
               workers: int) -> tuple[DistributedSampler, EpochOrder, DataLoader]:
    """This process's share of each epoch (`sampler`), the indices of the current pass (`order`, set per epoch)
    and the one DataLoader over them."""
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    order = EpochOrder()
    # its own generator: each pass's worker base seed is drawn from it, not from the global RNG, which the
    # autoencoder's posterior sampling draws from (a resumed run must see the same global draws)
    loader = DataLoader(dataset, batch_size=plan.micro_batch, sampler=order, num_workers=workers,
                        pin_memory=runtime.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed + runtime.rank))
    return sampler, order, loader


def mean_loss_and_stop(loss_sum: torch.Tensor, stop_flag: bool, plan: RunPlan, runtime: Runtime) -> tuple[float, bool]:
    """The step's loss (mean over micro-batches and ranks), and whether any rank got the stop signal."""
    both = torch.stack([loss_sum.float() / plan.gradient_accumulation_steps,
                        torch.tensor(float(stop_flag), device=runtime.device)])
    if runtime.world_size > 1:
        dist.all_reduce(both)
        both[0] /= runtime.world_size
    return float(both[0]), bool(both[1] > 0)


def log_start(cfg: dict, kind: str, runtime: Runtime, plan: RunPlan, step: int) -> None:
    log.info("rank %d of %d on node %s, device %s", runtime.rank, runtime.world_size,
             os.environ.get("SLURMD_NODENAME") or socket.gethostname(), runtime.device)
    if runtime.rank == 0:
        log.info("training the %s with %s on %d process(es), %s, %s: %d steps of %d volumes (%d steps per epoch), "
                 "from step %d", kind, cfg["train"]["backend"], runtime.world_size, device_name(runtime.device),
                 plan.precision, plan.total_steps, plan.samples_per_step, plan.steps_per_epoch, step)
