"""The training loop: one code path for one process and for N processes (one per GPU), and for every model
the workflow trains (the diffusion UNet, pixel or latent, and the autoencoder: tasks.py).

Every process runs `train(cfg, shards_dir, out_dir, kind)`. The rendezvous comes from the environment
(runtime.py); without it the run is a single process. Per optimizer step: `grad_accum` micro-batches
of `micro_batch` volumes per process, the task's objective (objectives.py: for the DDPM the
noise-prediction MSE, always computed in fp32), Adam, gradient clipping, then an EMA of the weights with
warm-up (`ema_decay_at`). The backend, precision and compilation sit behind `Engine` (engine.py); restoring and refusing checkpoints, stopping
for a requeue and writing the outputs are in resume.py; the loss log in progress.py.

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
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from brainddpm.config import performance_section, validate_config
from brainddpm.data.dataset import ShardDataset
from brainddpm.data.shards import latent_info, training_split
from brainddpm.device import resolve_performance
from brainddpm.fileio import sha256_file
from brainddpm.training import checkpoint as ckpt
from brainddpm.training.engine import Engine, ema_decay_at, ema_update, plan_run
from brainddpm.training.perf import device_name, mfu, peak_memory
from brainddpm.training.progress import StepLog, prepare_loss_csv, setup_logging
from brainddpm.training.resume import Progress, restore_checkpoint, stop_after_checkpoint, write_outputs
from brainddpm.training.runtime import Runtime, StopSignal, scoped_environment, setup_runtime
from brainddpm.training.tasks import build_task

log = logging.getLogger(__name__)


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


def train(cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> dict:
    """Train (or resume training) the `kind` of model (tasks.py) in this process; returns train.json's content."""
    validate_config(cfg, partial=True)
    setup_logging()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scoped_environment():
        runtime = setup_runtime(cfg["train"]["backend"], cfg["launch"]["gpus_per_node"],
                                cfg["launch"]["collective_timeout_s"])
        stop, cleanup = StopSignal(), ExitStack()
        try:
            return _train(cfg, Path(shards_dir), out_dir, runtime, stop, cleanup, kind)
        finally:
            cleanup.close()
            stop.restore()
            # a group of one stays for later calls in this process: DeepSpeed caches its groups
            if runtime.owns_group and runtime.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: dict, shards_dir: Path, out_dir: Path, runtime: Runtime, stop: StopSignal,
           cleanup: ExitStack, kind: str) -> dict:
    t_start, train_cfg, seed = time.time(), cfg["train"], cfg["seed"]
    split = training_split(shards_dir)
    dataset = ShardDataset(split, verify=train_cfg["verify_checksums"], cache=train_cfg["cache_in_memory"])
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    plan = plan_run(train_cfg, len(dataset), runtime)
    data_meta = data_description(split, dataset.files)
    index_sha = sha256_file(split / "index.json")
    task = build_task(kind, cfg, dataset, split, data_meta, runtime, plan)
    net = task.net
    performance = resolve_performance(performance_section(cfg), runtime.device)
    engine = Engine(train_cfg, plan, runtime, net, task.objective, performance, task.discriminator)
    cleanup.callback(engine.close)
    ema = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    random.seed(seed + runtime.rank)
    np.random.seed(seed + runtime.rank)
    torch.manual_seed(seed + runtime.rank)
    generator = torch.Generator(device=runtime.device).manual_seed(seed * 1000 + runtime.rank)  # noise, timesteps

    ckpt_root = out_dir / "checkpoints"
    progress = Progress()
    found = -1  # rank 0 looks for the newest valid checkpoint (hashing its files once), then tells the others
    if runtime.rank == 0 and (latest := ckpt.find_latest(ckpt_root)) is not None:
        found = ckpt.read_meta(latest)["step"]
    found = _broadcast_int(found, runtime)
    if found >= 0:
        restore_checkpoint(ckpt_root / f"step-{found:08d}", cfg, runtime, engine, ema, generator, index_sha, progress,
                           task.compared_sections)
    log.info("rank %d of %d on node %s, device %s", runtime.rank, runtime.world_size,
             os.environ.get("SLURMD_NODENAME") or socket.gethostname(), runtime.device)
    if runtime.rank == 0:
        prepare_loss_csv(ckpt_root / "loss.csv", progress.step)
        log.info("training the %s with %s on %d process(es), %s, %s: %d steps of %d volumes (%d steps per epoch), "
                 "from step %d", kind, train_cfg["backend"], runtime.world_size, device_name(runtime.device),
                 plan.precision, plan.total_steps, plan.samples_per_step, plan.steps_per_epoch, progress.step)

    def save_checkpoint() -> None:
        files = {ckpt.rank_file("rng", runtime.rank): ckpt.rng_state(generator)}
        if ckpt.is_partitioned(engine.optimizer):
            files[ckpt.rank_file("optimizer", runtime.rank)] = ckpt.optimizer_state(engine.optimizer)
        elif runtime.rank == 0:
            files["optimizer.pt"] = ckpt.optimizer_state(engine.optimizer)
        if runtime.rank == 0:
            files["model.pt"] = {"model": net.state_dict(), "ema": ema}
            if task.discriminator is not None:
                files["discriminator.pt"] = task.discriminator.state_dict()
        meta = {"epoch": progress.step / plan.steps_per_epoch, "samples_seen": progress.step * plan.samples_per_step,
                "lr": train_cfg["lr"], "world_size": runtime.world_size, "backend": train_cfg["backend"],
                "zero_stage": train_cfg["zero_stage"], "precision": plan.precision,
                "wall_time_s": progress.wall_before_s + time.time() - t_start, "final_loss": progress.last_loss,
                "config": cfg, "train_index_sha256": index_sha, "kind": kind}
        ckpt.save(ckpt_root, progress.step, files, meta, rank=runtime.rank, keep_last=train_cfg["keep_last"],
                  barrier=runtime.barrier)

    order = EpochOrder()
    workers = train_cfg["num_workers"]
    # its own generator: each pass's worker base seed is drawn from it, not from the global RNG, which the
    # autoencoder's posterior sampling draws from (a resumed run must see the same global draws)
    loader = DataLoader(dataset, batch_size=plan.micro_batch, sampler=order, num_workers=workers,
                        pin_memory=runtime.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed + runtime.rank))
    stop.install()
    steps = StepLog(ckpt_root / "loss.csv", plan.total_steps, progress.step, plan.steps_per_epoch,
                    plan.samples_per_process_step, train_cfg["lr"], train_cfg["log_every"], write=runtime.rank == 0)
    volumes_per_epoch = plan.steps_per_epoch * plan.samples_per_process_step
    while progress.step < plan.total_steps:
        epoch = progress.step // plan.steps_per_epoch
        sampler.set_epoch(epoch)
        done_in_epoch = (progress.step % plan.steps_per_epoch) * plan.samples_per_process_step
        order.indices = list(sampler)[done_in_epoch:volumes_per_epoch]
        loss_sum, t_prev = 0.0, time.perf_counter()
        for i, batch in enumerate(loader):
            boundary = (i + 1) % plan.gradient_accumulation_steps == 0
            x, context = batch if task.encoding else (batch, None)
            if context is not None:
                context = context.to(runtime.device, non_blocking=True)
            loss_sum = loss_sum + engine.micro_step(x.to(runtime.device, non_blocking=True), generator, boundary,
                                                    context, progress.step)
            if not boundary:
                continue
            ema_update(ema, net, ema_decay_at(progress.step, train_cfg["ema_decay"]))
            progress.step += 1
            step = progress.step
            both = torch.stack([loss_sum.float() / plan.gradient_accumulation_steps,
                                torch.tensor(float(stop.flag), device=runtime.device)])
            if runtime.world_size > 1:  # mean loss over ranks, and whether any rank got the stop signal
                dist.all_reduce(both)
                both[0] /= runtime.world_size
            loss, stop_now = float(both[0]), bool(both[1] > 0)
            loss_sum, progress.last_loss = 0.0, loss
            steps.step(step, epoch, loss, time.perf_counter() - t_prev)
            if step % train_cfg["checkpoint_every"] == 0 or step == plan.total_steps or stop_now:
                save_checkpoint()
            if stop_now:
                steps.close()
                stop_after_checkpoint(stop, runtime, step, ckpt_root)
            if step >= plan.total_steps:
                break
            t_prev = time.perf_counter()  # checkpointing and logging are not timed
        steps.end_epoch(epoch, mfu(task.flops, steps.epoch_samples_per_s, runtime.device, plan.precision),
                        peak_memory(runtime.device))
    steps.close()
    stop.restore()
    summary = {
        "epochs": progress.step / plan.steps_per_epoch, "steps": progress.step,
        "wall_time_s": progress.wall_before_s + time.time() - t_start,
        "final_loss": steps.final_loss if steps.final_loss is not None else progress.last_loss,
        "samples_per_s": steps.samples_per_s,
        "resumed_from_step": progress.resumed_from, "flops_per_sample": task.flops, "precision": plan.precision,
        "kind": kind,
    }
    discriminator = task.discriminator.net if task.discriminator is not None else None
    return write_outputs(cfg, out_dir, runtime, net, ema, summary, task.output, task.final_config, discriminator)


def data_description(split: Path, files: list[Path]) -> dict:
    """What the final file records about the data: the image grid (shape, affine, intensity range) and, for
    latent shards (data/shards.py: latent_info), the latent shape, scale factor and autoencoder."""
    with h5py.File(files[0], "r") as f:
        meta = {"target_shape": [int(s) for s in f.attrs["target_shape"]], "affine": f["affine"][()].tolist(),
                "intensity_range": [float(v) for v in f.attrs.get("intensity_range", [0.0, 1.0])]}
    latent = latent_info(split)
    if latent is not None:
        meta.update(target_shape=latent["image_shape"], latent_shape=latent["latent_shape"],
                    scale_factor=latent["scale_factor"], autoencoder_sha256=latent["autoencoder_sha256"])
    return meta


def _broadcast_int(value: int, runtime: Runtime) -> int:
    if runtime.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.broadcast(t, 0)
    return int(t.item())


