"""The training loop: one code path for one process and for N processes (one per GPU).

Every process runs `train(cfg, shards_dir, out_dir)`. The rendezvous comes from the environment
(runtime.py); without it the run is a single process. Per optimizer step: `grad_accum` micro-batches
of `micro_batch` volumes per process, the noise-prediction MSE (model.py, always computed in fp32),
Adam, gradient clipping, then an EMA of the weights with warm-up (`ema_decay_at`).

Backends (train.backend), behind one `Engine`:

* "deepspeed" (default): `deepspeed.initialize` with a config built from train.* (ZeRO stage
  train.zero_stage). bf16 goes through DeepSpeed's `torch_autocast` section, so the engine itself runs
  the forward under autocast (an autocast opened around the engine is switched *off* by DeepSpeed when
  that section is missing: the run would silently train in fp32).
* "accelerate": HuggingFace Accelerate, the reference study's library: `Accelerator(mixed_precision=
  "bf16")` wraps the model (DDP on several processes), and its `accumulate`, `backward` and
  `clip_grad_norm_` drive the step. Accelerate reads the same RANK/WORLD_SIZE/MASTER_ADDR rendezvous.
* "ddp": plain torch DistributedDataParallel (no wrapper for one process) under torch autocast.

Why Accelerate sits beside the others (option b of the issue) instead of replacing the loop's
branches: the loop's checkpoints must stay atomic (a manifest written last), load with
`weights_only=True` and be refused when the run changed; Accelerate's `save_state` pickles its RNG and
sampler objects and writes in place, so checkpointing stays here for every backend, and Accelerate is
used for what it does well (device placement, DDP wrapping, mixed precision, accumulation, clipping).

Precision (train.precision: auto = bf16 on GPUs with native bf16, fp32 on CPUs): every backend keeps
fp32 weights ("master weights"), fp32 Adam state and an fp32 EMA; only the forward/backward arithmetic
runs in bf16 under autocast, and gradients are all-reduced in fp32. DeepSpeed's own `bf16` mode, which
casts the module's weights to bf16, is not used: the EMA would then average bf16-rounded weights.

Resume is exact: the data order is a DistributedSampler permutation per epoch, and a resumed run skips
the micro-batches already done in its epoch; the noise and timesteps come from a per-rank generator
whose state is checkpointed with everything else (checkpoint.py). Exact means bit-for-bit on the CPU;
on GPUs cuDNN's autotuned kernels make it exact up to float non-determinism. On the preemption signal
(SIGUSR2, sent by SLURM or submitit before the time limit) every rank stops at the next step boundary,
the run checkpoints, and submitit's handler requeues the job (launch.py).

The learning rate is used as given, whatever the global batch (processes x micro_batch x grad_accum):
with more GPUs each step averages more volumes, and the epoch has fewer steps. Scale train.lr yourself
if you change the global batch a lot (Adam: roughly with its square root).

Outputs in out_dir: model.safetensors (EMA weights), loss.csv, loss.png, train.json, checkpoints/.
The running loss log lives in checkpoints/loss.csv (Snakemake deletes a rule's outputs before a rerun;
the history must survive that) and is copied to loss.csv at the end.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from monai.networks.schedulers import DDPMScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from brainddpm.config import is_conditioned, validate_config
from brainddpm.data.dataset import ShardDataset
from brainddpm.data.shards import training_split
from brainddpm.errors import BadInputError, CheckpointError, ConfigError
from brainddpm.fileio import atomic_path, sha256_file
from brainddpm.models.conditioning import CovariateEncoding, fit_encoding
from brainddpm.models.diffusion import build_model, build_scheduler, diffusion_loss
from brainddpm.models.final import save_final
from brainddpm.training import checkpoint as ckpt
from brainddpm.training.perf import autocast, device_name, flops_per_sample, mfu, peak_flops, peak_memory, use_bf16
from brainddpm.training.progress import plot_loss
from brainddpm.training.runtime import Runtime, StopSignal, TrainingInterrupted, scoped_environment, setup_runtime

log = logging.getLogger(__name__)

# train.* keys that change the result: a checkpoint made with other values is not resumed
RESULT_KEYS = ("lr", "betas", "weight_decay", "ema_decay", "grad_clip", "backend", "precision")


@dataclass(frozen=True)
class RunPlan:
    """The constants of one training run, fixed before the first step."""
    micro_batch: int  # volumes per process per forward/backward
    gradient_accumulation_steps: int
    world_size: int  # processes
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    bf16: bool

    @property
    def samples_per_step(self) -> int:
        """Volumes per optimizer step over all processes (the global batch)."""
        return self.micro_batch * self.gradient_accumulation_steps * self.world_size

    @property
    def samples_per_process_step(self) -> int:
        return self.micro_batch * self.gradient_accumulation_steps

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def plan_run(train_cfg: dict, n_volumes: int, runtime: Runtime) -> RunPlan:
    """Steps per epoch and in total for `n_volumes` training volumes; a ConfigError when not even one step fits."""
    micro_batch, accumulation = train_cfg["micro_batch"], train_cfg["grad_accum"]
    per_process = n_volumes // runtime.world_size  # DistributedSampler with drop_last
    steps_per_epoch = per_process // micro_batch // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'train.micro_batch': the training split has {n_volumes} volumes, fewer than "
                          f"micro_batch x grad_accum x processes = {micro_batch * accumulation * runtime.world_size}")
    total_steps = train_cfg["epochs"] * steps_per_epoch
    if train_cfg["max_steps"]:
        total_steps = min(total_steps, train_cfg["max_steps"])
    return RunPlan(micro_batch, accumulation, runtime.world_size, steps_per_epoch, total_steps,
                   use_bf16(train_cfg["precision"], runtime.device))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay for the update after `step` optimizer steps: min(decay, (1+step)/(10+step)).

    The warm-up of common diffusion trainers (e.g. diffusers' EMAModel): early updates follow the
    weights closely, so the exported EMA does not keep a share of the random initialisation (with a
    fixed 0.9999 over 20k steps, 13.5% of it would remain).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    for name, value in net.state_dict().items():
        if value.dtype.is_floating_point:
            ema[name].lerp_(value.float(), 1.0 - decay)
        else:
            ema[name].copy_(value)


def deepspeed_config(train_cfg: dict, plan: RunPlan) -> dict:
    """DeepSpeed's config for this run; bf16 through its `torch_autocast` section (fp32 weights, see above)."""
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "zero_optimization": {"stage": train_cfg["zero_stage"]},
        "gradient_clipping": train_cfg["grad_clip"] or 0.0,
        # empty list: no parameter is marked for bf16 communication, so gradients are all-reduced in fp32
        "torch_autocast": {"enabled": plan.bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


class Engine:
    """One backend behind one interface: `micro_step` runs the forward and backward of one micro-batch and,
    at an accumulation boundary, clips and steps the optimizer. `net` is the bare UNet (whose weights are
    saved and averaged), `optimizer` the object whose state is checkpointed."""

    def __init__(self, train_cfg: dict, plan: RunPlan, runtime: Runtime, net: torch.nn.Module,
                 scheduler: DDPMScheduler) -> None:
        self.backend, self.plan, self.net, self.scheduler = train_cfg["backend"], plan, net, scheduler
        self.grad_clip = train_cfg["grad_clip"]
        self.accelerator = None
        optimizer = torch.optim.Adam(net.parameters(), lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                                     weight_decay=train_cfg["weight_decay"])
        if self.backend == "deepspeed":
            import deepspeed

            deepspeed.utils.logger.setLevel(logging.WARNING)
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer,
                                                                    config=deepspeed_config(train_cfg, plan))
        elif self.backend == "accelerate":
            from accelerate import Accelerator

            self.accelerator = Accelerator(mixed_precision="bf16" if plan.bf16 else "no",
                                           cpu=runtime.device.type == "cpu",
                                           gradient_accumulation_steps=plan.gradient_accumulation_steps)
            self.model, self.optimizer = self.accelerator.prepare(net, optimizer)
        elif runtime.world_size > 1:
            cuda = runtime.device.type == "cuda"
            self.model = DistributedDataParallel(net, device_ids=[runtime.device.index] if cuda else None)
            self.optimizer = optimizer
        else:
            self.model, self.optimizer = net, optimizer
        self.device = runtime.device
        if train_cfg.get("compile") and runtime.device.type == "cuda":  # +55% on one H100 (docs/benchmarks.md)
            if self.backend == "deepspeed":
                self.model.compile()  # DeepSpeedEngine.compile: the engine keeps its hooks around the compiled module
            else:
                self.model = torch.compile(self.model)

    def micro_step(self, x: torch.Tensor, generator: torch.Generator, boundary: bool,
                   context: torch.Tensor | None = None, drop_prob: float = 0.0) -> torch.Tensor:
        """Loss of one micro-batch (detached); the optimizer steps when `boundary`.

        `context`: the micro-batch's condition vectors (a conditional model), dropped with `drop_prob`."""
        def loss_of_batch() -> torch.Tensor:
            return diffusion_loss(self.model, self.scheduler, x, generator, context, drop_prob)

        if self.backend == "deepspeed":  # the engine autocasts, scales by 1/accumulation, clips and steps
            loss = loss_of_batch()
            self.model.backward(loss)
            self.model.step()
            return loss.detach()
        if self.backend == "accelerate":  # Accelerate autocasts, skips the sync and the step off-boundary
            with self.accelerator.accumulate(self.model):
                if self.accelerator.sync_gradients != boundary:
                    raise RuntimeError("Accelerate's accumulation counter disagrees with the loop's")
                loss = loss_of_batch()
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.grad_clip:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        skip_sync = isinstance(self.model, DistributedDataParallel) and not boundary
        with self.model.no_sync() if skip_sync else nullcontext():
            with autocast(x.device, self.plan.bf16):
                loss = loss_of_batch()
            (loss / self.plan.gradient_accumulation_steps).backward()
        if boundary:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        if self.accelerator is not None:  # Accelerate keeps process-wide state; the next run starts clean
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)


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


@dataclass
class Progress:
    """What changes as the run goes: restored from a checkpoint on resume."""
    step: int = 0
    wall_before_s: float = 0.0  # training time of earlier jobs of this run
    resumed_from: int | None = None
    last_loss: float | None = None


def train(cfg: dict, shards_dir: Path, out_dir: Path) -> dict:
    """Train (or resume training) in this process; returns the content of train.json."""
    validate_config(cfg, partial=True)
    _setup_logging()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scoped_environment():
        runtime = setup_runtime(cfg["train"]["backend"], cfg["launch"]["gpus_per_node"],
                                cfg["launch"]["collective_timeout_s"])
        stop, cleanup = StopSignal(), ExitStack()
        try:
            return _train(cfg, Path(shards_dir), out_dir, runtime, stop, cleanup)
        finally:
            cleanup.close()
            stop.restore()
            # a group of one stays for later calls in this process: DeepSpeed caches its groups
            if runtime.owns_group and runtime.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: dict, shards_dir: Path, out_dir: Path, runtime: Runtime, stop: StopSignal,
           cleanup: ExitStack) -> dict:
    t_start, train_cfg, seed = time.time(), cfg["train"], cfg["seed"]
    split = training_split(shards_dir)
    dataset = ShardDataset(split, verify=train_cfg["verify_checksums"], cache=train_cfg["cache_in_memory"])
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    plan = plan_run(train_cfg, len(dataset), runtime)
    data_meta = _data_meta(dataset.files)
    index_sha = sha256_file(split / "index.json")
    encoding = condition_dataset(cfg, dataset, split)
    context_dim = encoding.dim if encoding else None
    drop_prob = cfg["condition"]["drop_prob"] if encoding else 0.0

    torch.manual_seed(seed)  # the same initial weights on every rank
    net = build_model(cfg["model"], context_dim).to(runtime.device).train()
    scheduler = build_scheduler(cfg["scheduler"])
    flops = flops_per_sample(net, data_meta["target_shape"], runtime.device, plan.bf16,
                             scheduler.num_train_timesteps, context_dim) if peak_flops(runtime.device) else None
    engine = Engine(train_cfg, plan, runtime, net, scheduler)
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
        _resume(ckpt_root / f"step-{found:08d}", cfg, runtime, engine, ema, generator, index_sha, progress)
    log.info("rank %d of %d on node %s, device %s", runtime.rank, runtime.world_size,
             os.environ.get("SLURMD_NODENAME") or socket.gethostname(), runtime.device)
    if runtime.rank == 0:
        _prepare_csv(ckpt_root / "loss.csv", progress.step)
        log.info("training %s on %d process(es), %s, %s: %d steps of %d volumes (%d steps per epoch), from step %d",
                 train_cfg["backend"], runtime.world_size, device_name(runtime.device), plan.precision,
                 plan.total_steps, plan.samples_per_step, plan.steps_per_epoch, progress.step)

    def save_checkpoint() -> None:
        files = {ckpt.rank_file("rng", runtime.rank): ckpt.rng_state(generator)}
        if ckpt.is_partitioned(engine.optimizer):
            files[ckpt.rank_file("optimizer", runtime.rank)] = ckpt.optimizer_state(engine.optimizer)
        elif runtime.rank == 0:
            files["optimizer.pt"] = ckpt.optimizer_state(engine.optimizer)
        if runtime.rank == 0:
            files["model.pt"] = {"model": net.state_dict(), "ema": ema}
        meta = {"epoch": progress.step / plan.steps_per_epoch, "samples_seen": progress.step * plan.samples_per_step,
                "lr": train_cfg["lr"], "world_size": runtime.world_size, "backend": train_cfg["backend"],
                "zero_stage": train_cfg["zero_stage"], "precision": plan.precision,
                "wall_time_s": progress.wall_before_s + time.time() - t_start, "final_loss": progress.last_loss,
                "config": cfg, "train_index_sha256": index_sha}
        ckpt.save(ckpt_root, progress.step, files, meta, rank=runtime.rank, keep_last=train_cfg["keep_last"],
                  barrier=runtime.barrier)

    order = EpochOrder()
    workers = train_cfg["num_workers"]
    loader = DataLoader(dataset, batch_size=plan.micro_batch, sampler=order, num_workers=workers,
                        pin_memory=runtime.device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    stop.install()
    bar = None
    if runtime.rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=progress.step, unit="step", dynamic_ncols=True)
    recent = collections.deque(maxlen=plan.steps_per_epoch)  # losses of the last epoch's worth of steps
    timed_samples, timed_s, first_step = 0, 0.0, True
    volumes_per_epoch = plan.steps_per_epoch * plan.samples_per_process_step
    while progress.step < plan.total_steps:
        epoch = progress.step // plan.steps_per_epoch
        sampler.set_epoch(epoch)
        done_in_epoch = (progress.step % plan.steps_per_epoch) * plan.samples_per_process_step
        order.indices = list(sampler)[done_in_epoch:volumes_per_epoch]
        loss_sum, epoch_losses, epoch_samples, epoch_s = 0.0, [], 0, 0.0
        t_prev = time.perf_counter()
        for i, batch in enumerate(loader):
            boundary = (i + 1) % plan.gradient_accumulation_steps == 0
            x, context = batch if encoding else (batch, None)
            if context is not None:
                context = context.to(runtime.device, non_blocking=True)
            loss_sum = loss_sum + engine.micro_step(x.to(runtime.device, non_blocking=True), generator, boundary,
                                                    context, drop_prob)
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
            dt = time.perf_counter() - t_prev
            if not first_step:  # the first step of a run includes warm-up: not timed
                timed_samples, timed_s = timed_samples + plan.samples_per_process_step, timed_s + dt
            first_step = False
            epoch_losses.append(loss)
            recent.append(loss)
            epoch_samples, epoch_s = epoch_samples + plan.samples_per_process_step, epoch_s + dt
            if runtime.rank == 0:
                rate = plan.samples_per_process_step / dt
                with open(ckpt_root / "loss.csv", "a", newline="") as f:
                    csv.writer(f).writerow([step, epoch, f"{loss:.6g}", train_cfg["lr"], f"{rate:.4g}"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
                elif step % train_cfg["log_every"] == 0:
                    log.info("step %d/%d epoch %d loss %.5g lr %.3g %.3g samples/s/process", step, plan.total_steps,
                             epoch, loss, train_cfg["lr"], rate)
            if step % train_cfg["checkpoint_every"] == 0 or step == plan.total_steps or stop_now:
                save_checkpoint()
            if stop_now:
                _stop(stop, runtime, step, ckpt_root, bar)
            if step >= plan.total_steps:
                break
            t_prev = time.perf_counter()  # checkpointing and logging are not timed
        if runtime.rank == 0 and epoch_losses:
            rate = epoch_samples / epoch_s
            util = mfu(flops, rate, runtime.device, plan.precision)
            log.info("epoch %d: mean loss %.5g, %.3g samples/s per process, MFU %s, peak memory %.3g GiB", epoch,
                     sum(epoch_losses) / len(epoch_losses), rate, "n/a" if util is None else f"{util:.1%}",
                     peak_memory(runtime.device) / 2**30)
    if bar is not None:
        bar.close()
    stop.restore()
    summary = {
        "epochs": progress.step / plan.steps_per_epoch, "steps": progress.step,
        "wall_time_s": progress.wall_before_s + time.time() - t_start,
        "final_loss": sum(recent) / len(recent) if recent else progress.last_loss,
        "samples_per_s": timed_samples / timed_s if timed_s > 0 else None,
        "resumed_from_step": progress.resumed_from, "flops_per_sample": flops, "precision": plan.precision,
    }
    return _finish(cfg, out_dir, runtime, net, ema, data_meta, summary, encoding)


def condition_dataset(cfg: dict, dataset: ShardDataset, split: Path) -> CovariateEncoding | None:
    """For a conditional run: fit the covariate encoding on the training split and attach each volume's
    condition vector to `dataset`; None for an unconditional run (nothing changes)."""
    if not is_conditioned(cfg):
        return None
    if any("covariates" not in m for m in dataset.meta):
        raise BadInputError(split / "index.json", "the training shards hold no covariates: they were written "
                            "without condition.covariates; rerun the data stage with this config")
    covariates = [m["covariates"] for m in dataset.meta]
    encoding = fit_encoding(cfg["condition"], covariates, source=str(split / "index.json"))
    dataset.conditions = encoding.vectors(covariates)
    log.info("conditioning on %s (vector of %d, drop probability %.2f)", ", ".join(encoding.names), encoding.dim,
             cfg["condition"]["drop_prob"])
    return encoding


def _data_meta(files: list[Path]) -> dict:
    with h5py.File(files[0], "r") as f:
        return {"target_shape": [int(s) for s in f.attrs["target_shape"]], "affine": f["affine"][()].tolist(),
                "intensity_range": [float(v) for v in f.attrs.get("intensity_range", [0.0, 1.0])]}


def _weights_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _broadcast_int(value: int, runtime: Runtime) -> int:
    if runtime.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.broadcast(t, 0)
    return int(t.item())


def _prepare_csv(path: Path, keep_until_step: int) -> None:
    """loss.csv with the header and the rows up to the resumed step (later ones are redone)."""
    rows = []
    if keep_until_step > 0 and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and int(r[0]) <= keep_until_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["step", "epoch", "loss", "lr", "samples_per_s"], *rows])


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


def _resume(path: Path, cfg: dict, runtime: Runtime, engine: Engine, ema: dict[str, torch.Tensor],
            generator: torch.Generator, index_sha: str, progress: Progress) -> None:
    """Load a checkpoint into the model, EMA, optimizer, this rank's RNGs and `progress`.

    Only the budget (epochs, max_steps) and bookkeeping may change between a checkpoint and its resume:
    another model, schedule, seed, optimiser setting or training set would silently mix two runs.
    """
    meta = ckpt.read_meta(path)
    old = meta["config"]
    changed = [s for s in ("model", "scheduler", "seed") if old[s] != cfg[s]]
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
    rng_file = path / ckpt.rank_file("rng", runtime.rank)
    if rng_file.exists():
        ckpt.set_rng_state(ckpt.load_file(rng_file), generator)
    if runtime.rank == 0:
        log.info("resumed from %s (step %d)", path, meta["step"])
    progress.step = progress.resumed_from = meta["step"]
    progress.wall_before_s, progress.last_loss = meta["wall_time_s"], meta.get("final_loss")


def _stop(stop: StopSignal, runtime: Runtime, step: int, ckpt_root: Path, bar: Any) -> None:
    """After the stop checkpoint: hand over to submitit (rank 0 requeues and exits), or raise."""
    if bar is not None:
        bar.close()
    log.warning("rank %d: preemption signal; checkpoint saved at step %d", runtime.rank, step)
    # inside submitit, the previous handler is submitit's: on rank 0 it requeues and exits (or raises when
    # out of requeues); on the other ranks it returns, and they leave quietly
    if stop.forward() and runtime.rank != 0 and os.environ.get("SUBMITIT_EXECUTOR"):
        raise SystemExit(0)
    raise TrainingInterrupted(f"training stopped by signal at step {step}; the checkpoint in {ckpt_root} "
                              "lets a rerun resume")


def _finish(cfg: dict, out_dir: Path, runtime: Runtime, net: torch.nn.Module, ema: dict[str, torch.Tensor],
            data_meta: dict, summary: dict, encoding: CovariateEncoding | None) -> dict:
    """Write model.safetensors, loss.png and train.json (rank 0); return train.json's content."""
    digests = [_weights_digest(net)]
    if runtime.world_size > 1:
        digests = [None] * runtime.world_size
        dist.all_gather_object(digests, _weights_digest(net))
        if len(set(digests)) > 1:
            log.error("the model weights differ between ranks at the end of training: %s", digests)
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
        final_cfg = {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data_meta}
        if encoding is not None:  # sampling needs nothing but this file
            final_cfg["condition"] = {**encoding.to_dict(), "drop_prob": cfg["condition"]["drop_prob"]}
        save_final(out_dir / "model.safetensors", ema, final_cfg, summary["steps"])
        with atomic_path(out_dir / "loss.csv") as tmp:
            shutil.copyfile(out_dir / "checkpoints" / "loss.csv", tmp)
        plot_loss(out_dir / "loss.csv", out_dir / "loss.png")
        with atomic_path(out_dir / "train.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, outputs in %s", summary["steps"], summary["final_loss"], out_dir)
    runtime.barrier()
    return summary
