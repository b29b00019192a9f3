"""The training loop: one code path for one process and for N processes (one per GPU).

Every process runs `train(cfg, shards_dir, out_dir)`. The rendezvous comes from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: exported by submitit's
TorchDistributedEnvironment in launch.py); without it the run is a single process. Per optimizer step:
`grad_accum` micro-batches of `micro_batch` volumes per process, noise-prediction MSE (model.py), Adam,
gradient clipping, then an EMA of the weights. bf16 autocast on GPU, fp32 on CPU (train.precision).

Backends (train.backend): "deepspeed" (deepspeed.initialize with a config built from train.*, ZeRO
stage train.zero_stage) or "ddp" (torch DistributedDataParallel; no wrapper for one process). Both keep
fp32 weights under the same torch bf16 autocast (DeepSpeed's own bf16 mode, which casts the weights,
is not used), so the backends train the same numbers and the EMA averages fp32 weights.

Resume is exact: the data order is a DistributedSampler permutation per epoch, and a resumed run skips
the micro-batches already done in its epoch; the noise and timesteps come from a per-rank generator
whose state is checkpointed with everything else (checkpoint.py). Exact means bit-for-bit on the CPU;
on GPUs cuDNN's autotuned kernels (cudnn.benchmark) make it exact up to float non-determinism. On the
preemption signal
(SIGUSR2, sent by SLURM or submitit before the time limit) every rank stops at the next step boundary,
the run checkpoints, and submitit's handler requeues the job (launch.py).

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
import shutil
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint as ckpt
from .atomic import atomic_path
from .bench_train import autocast, device_name, flops_per_sample, mfu, peak_flops, peak_memory
from .config import validate_config
from .dataset import ShardDataset
from .errors import ConfigError
from .launch import Dist, StopSignal, TrainingInterrupted, setup_distributed
from .model import build_model, build_scheduler, diffusion_loss
from .nifti import sha256_file
from .plots import plot_loss

log = logging.getLogger(__name__)


def split_dir(shards_dir: Path) -> Path:
    """The training split: `shards_dir` itself when it holds index.json, else its train/ folder."""
    return shards_dir if (shards_dir / "index.json").exists() or not (shards_dir / "train").is_dir() \
        else shards_dir / "train"


def _data_meta(files: list[Path]) -> dict:
    with h5py.File(files[0], "r") as f:
        return {"target_shape": [int(s) for s in f.attrs["target_shape"]], "affine": f["affine"][()].tolist(),
                "intensity_range": [float(v) for v in f.attrs.get("intensity_range", [0.0, 1.0])]}


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _wrap(net: torch.nn.Module, optimizer: torch.optim.Optimizer, tc: dict, d: Dist) -> tuple[torch.nn.Module, Any]:
    """(model to call, optimizer to step): a DeepSpeed engine, a DDP wrapper, or the bare model."""
    if tc["backend"] == "deepspeed":
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        config = {
            "train_micro_batch_size_per_gpu": tc["micro_batch"], "gradient_accumulation_steps": tc["grad_accum"],
            "zero_optimization": {"stage": tc["zero_stage"]}, "gradient_clipping": tc["grad_clip"] or 0.0,
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
        }
        args = SimpleNamespace(device_rank=d.device.index) if d.device.type == "cuda" else None
        engine, optimizer, _, _ = deepspeed.initialize(args=args, model=net, optimizer=optimizer, config=config)
        return engine, optimizer
    if d.world > 1:
        return DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None), optimizer
    return net, optimizer


def _micro_step(model: torch.nn.Module, optimizer: Any, net: torch.nn.Module, scheduler: DDPMScheduler,
                x: torch.Tensor, gen: torch.Generator, boundary: bool, tc: dict, bf16: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; the optimizer steps at the accumulation boundary."""
    if tc["backend"] == "deepspeed":  # DeepSpeed scales by 1/grad_accum, clips and steps at the boundary
        with autocast(x.device, bf16):
            loss = diffusion_loss(model, scheduler, x, gen)
        model.backward(loss)
        model.step()
        return loss.detach()
    skip_sync = isinstance(model, DistributedDataParallel) and not boundary
    with model.no_sync() if skip_sync else nullcontext():
        with autocast(x.device, bf16):
            loss = diffusion_loss(model, scheduler, x, gen)
        (loss / tc["grad_accum"]).backward()
    if boundary:
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float) -> None:
    for name, value in net.state_dict().items():
        if value.dtype.is_floating_point:
            ema[name].lerp_(value.float(), 1.0 - decay)
        else:
            ema[name].copy_(value)


def _weights_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _broadcast_int(value: int, d: Dist) -> int:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.broadcast(t, 0)
    return int(t.item())


_RESULT_KEYS = ("lr", "betas", "weight_decay", "ema_decay", "grad_clip", "backend", "precision")


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


def train(cfg: dict, shards_dir: Path, out_dir: Path) -> dict:
    """Train (or resume training) in this process; returns the content of train.json."""
    validate_config(cfg, partial=True)
    _setup_logging()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d, added_env = setup_distributed(cfg["train"]["backend"])
    stop = StopSignal()
    try:
        return _train(cfg, Path(shards_dir), out_dir, d, stop)
    finally:
        stop.restore()
        # a group of one stays for later calls in this process: DeepSpeed caches its groups
        if d.owns_group and d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        for key in added_env:
            os.environ.pop(key, None)


def _train(cfg: dict, shards_dir: Path, out_dir: Path, d: Dist, stop: StopSignal) -> dict:
    t_start, tc, seed = time.time(), cfg["train"], cfg["seed"]
    mb, ga = tc["micro_batch"], tc["grad_accum"]
    dataset = ShardDataset(split_dir(shards_dir), verify=tc["verify_checksums"], cache=tc["cache_in_memory"])
    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = len(sampler) // mb // ga
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'train.micro_batch': the training split has {len(dataset)} volumes, fewer "
                          f"than micro_batch x grad_accum x processes = {mb * ga * d.world}")
    total_steps = tc["epochs"] * steps_per_epoch
    if tc["max_steps"]:
        total_steps = min(total_steps, tc["max_steps"])
    data_meta = _data_meta(dataset.files)
    index_sha = sha256_file(split_dir(shards_dir) / "index.json")

    torch.manual_seed(seed)  # the same initial weights on every rank
    net = build_model(cfg["model"]).to(d.device).train()
    scheduler = build_scheduler(cfg["scheduler"])
    bf16 = _use_bf16(tc["precision"], d.device)
    fps = flops_per_sample(net, data_meta["target_shape"], d.device, bf16, scheduler.num_train_timesteps) \
        if peak_flops(d.device) else None
    optimizer = torch.optim.Adam(net.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]),
                                 weight_decay=tc["weight_decay"])
    model, optimizer = _wrap(net, optimizer, tc, d)
    ema = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    random.seed(seed + d.rank)
    np.random.seed(seed + d.rank)
    torch.manual_seed(seed + d.rank)
    gen = torch.Generator(device=d.device).manual_seed(seed * 1000 + d.rank)  # noise and timesteps

    ckpt_root = out_dir / "checkpoints"
    step, wall_before, resumed_from, last_loss = 0, 0.0, None, None
    found = -1  # rank 0 looks for the newest valid checkpoint (hashing its files once), then tells the others
    if d.rank == 0 and (latest := ckpt.find_latest(ckpt_root)) is not None:
        found = ckpt.read_meta(latest)["step"]
    found = _broadcast_int(found, d)
    if found >= 0:
        step, wall_before, last_loss = _resume(ckpt_root / f"step-{found:08d}", cfg, d, net, ema, optimizer, gen,
                                               index_sha)
        resumed_from = step
    if d.rank == 0:
        _prepare_csv(ckpt_root / "loss.csv", step)
        log.info("training %s on %d process(es), %s, %s: %d steps of %d volumes (%d steps per epoch), from step %d",
                 tc["backend"], d.world, device_name(d.device), "bf16" if bf16 else "fp32", total_steps,
                 mb * ga * d.world, steps_per_epoch, step)

    def save_checkpoint() -> None:
        files = {ckpt.rank_file("rng", d.rank): ckpt.rng_state(gen)}
        if ckpt.is_partitioned(optimizer):
            files[ckpt.rank_file("optimizer", d.rank)] = ckpt.optimizer_state(optimizer)
        elif d.rank == 0:
            files["optimizer.pt"] = ckpt.optimizer_state(optimizer)
        if d.rank == 0:
            files["model.pt"] = {"model": net.state_dict(), "ema": ema}
        meta = {"epoch": step / steps_per_epoch, "samples_seen": step * mb * ga * d.world, "lr": tc["lr"],
                "world_size": d.world, "backend": tc["backend"], "zero_stage": tc["zero_stage"],
                "wall_time_s": wall_before + time.time() - t_start, "final_loss": last_loss, "config": cfg,
                "train_index_sha256": index_sha}
        ckpt.save(ckpt_root, step, files, meta, rank=d.rank, keep_last=tc["keep_last"], barrier=d.barrier)

    stop.install()
    bar = None
    if d.rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    recent = collections.deque(maxlen=steps_per_epoch)  # losses of the last epoch's worth of steps
    timed_samples, timed_s, first_step = 0, 0.0, True
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = list(sampler)[(step % steps_per_epoch) * ga * mb: steps_per_epoch * ga * mb]
        loader = DataLoader(dataset, batch_size=mb, sampler=order, num_workers=tc["num_workers"],
                            pin_memory=d.device.type == "cuda", drop_last=True)
        acc, epoch_losses, epoch_samples, epoch_s = 0.0, [], 0, 0.0
        t_prev = time.perf_counter()
        for i, x in enumerate(loader):
            boundary = (i + 1) % ga == 0
            acc = acc + _micro_step(model, optimizer, net, scheduler, x.to(d.device, non_blocking=True), gen,
                                    boundary, tc, bf16)
            if not boundary:
                continue
            step += 1
            _ema_update(ema, net, tc["ema_decay"])
            both = torch.stack([acc.float() / ga, torch.tensor(float(stop.flag), device=d.device)])
            if d.world > 1:  # mean loss over ranks, and whether any rank got the stop signal
                dist.all_reduce(both)
                both[0] /= d.world
            loss, stop_now = float(both[0]), bool(both[1] > 0)
            acc, last_loss = 0.0, loss
            dt = time.perf_counter() - t_prev
            if not first_step:  # the first step of a run includes warm-up: not timed
                timed_samples, timed_s = timed_samples + mb * ga, timed_s + dt
            first_step = False
            epoch_losses.append(loss)
            recent.append(loss)
            epoch_samples, epoch_s = epoch_samples + mb * ga, epoch_s + dt
            if d.rank == 0:
                with open(ckpt_root / "loss.csv", "a", newline="") as f:
                    csv.writer(f).writerow([step, epoch, f"{loss:.6g}", tc["lr"], f"{mb * ga / dt:.4g}"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
                elif step % tc["log_every"] == 0:
                    log.info("step %d/%d epoch %d loss %.5g lr %.3g %.3g samples/s/process", step, total_steps,
                             epoch, loss, tc["lr"], mb * ga / dt)
            if step % tc["checkpoint_every"] == 0 or step == total_steps or stop_now:
                save_checkpoint()
            if stop_now:
                _stop(stop, d, step, ckpt_root, bar)
            if step >= total_steps:
                break
            t_prev = time.perf_counter()  # checkpointing and logging are not timed
        if d.rank == 0 and epoch_losses:
            sps = epoch_samples / epoch_s
            util = mfu(fps, sps, d.device)
            log.info("epoch %d: mean loss %.5g, %.3g samples/s per process, MFU %s, peak memory %.3g GiB", epoch,
                     sum(epoch_losses) / len(epoch_losses), sps, "n/a" if util is None else f"{util:.1%}",
                     peak_memory(d.device) / 2**30)
    if bar is not None:
        bar.close()
    stop.restore()
    return _finish(cfg, out_dir, d, net, ema, step, steps_per_epoch, data_meta, fps,
                   wall_before + time.time() - t_start, resumed_from,
                   sum(recent) / len(recent) if recent else last_loss,
                   timed_samples / timed_s if timed_s > 0 else None)


def _resume(path: Path, cfg: dict, d: Dist, net: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: Any,
            gen: torch.Generator, index_sha: str) -> tuple[int, float, float | None]:
    """Load a checkpoint into the model, EMA, optimizer and this rank's RNGs; (step, wall time, loss).

    Only the budget (epochs, max_steps) and bookkeeping may change between a checkpoint and its resume:
    another model, schedule, seed, optimiser setting or training set would silently mix two runs.
    """
    meta = ckpt.read_meta(path)
    old = meta["config"]
    changed = [s for s in ("model", "scheduler", "seed") if old[s] != cfg[s]]
    changed += [f"train.{k}" for k in _RESULT_KEYS if old["train"][k] != cfg["train"][k]]
    if meta.get("train_index_sha256", index_sha) != index_sha:
        changed.append("the training shards (index.json)")
    if changed:
        raise ckpt.CheckpointError(f"{path} was trained with a different {', '.join(changed)}; use another run "
                                   f"name, or delete {path.parent} to start afresh")
    if ckpt.is_partitioned(optimizer) and meta["world_size"] != d.world:
        raise ckpt.CheckpointError(f"{path} holds ZeRO-{meta['zero_stage']} optimizer state partitioned over "
                                   f"{meta['world_size']} processes; this run has {d.world}: resume with "
                                   f"{meta['world_size']}")
    if meta["world_size"] != d.world or any(meta["config"]["train"][k] != cfg["train"][k]
                                            for k in ("micro_batch", "grad_accum")):
        log.warning("resuming %s with another number of processes or batch layout: the data order and noise "
                    "differ from an uninterrupted run", path)
    state = ckpt.load_file(path / "model.pt")
    net.load_state_dict(state["model"])
    for k, v in state["ema"].items():
        ema[k].copy_(v)
    opt_file = ckpt.rank_file("optimizer", d.rank) if ckpt.is_partitioned(optimizer) else "optimizer.pt"
    ckpt.load_optimizer_state(optimizer, ckpt.load_file(path / opt_file))
    rng_file = path / ckpt.rank_file("rng", d.rank)
    if rng_file.exists():
        ckpt.set_rng_state(ckpt.load_file(rng_file), gen)
    if d.rank == 0:
        log.info("resumed from %s (step %d)", path, meta["step"])
    return meta["step"], meta["wall_time_s"], meta.get("final_loss")


def _stop(stop: StopSignal, d: Dist, step: int, ckpt_root: Path, bar: Any) -> None:
    """After the stop checkpoint: hand over to submitit (rank 0 requeues and exits), or raise."""
    if bar is not None:
        bar.close()
    log.warning("rank %d: preemption signal; checkpoint saved at step %d", d.rank, step)
    # inside submitit, the previous handler is submitit's: on rank 0 it requeues and exits (or raises when
    # out of requeues); on the other ranks it returns, and they leave quietly
    if stop.forward() and d.rank != 0 and os.environ.get("SUBMITIT_EXECUTOR"):
        raise SystemExit(0)
    raise TrainingInterrupted(f"training stopped by signal at step {step}; the checkpoint in {ckpt_root} "
                              "lets a rerun resume")


def _finish(cfg: dict, out_dir: Path, d: Dist, net: torch.nn.Module, ema: dict[str, torch.Tensor], step: int,
            steps_per_epoch: int, data_meta: dict, fps: int | None, wall_s: float, resumed_from: int | None,
            final_loss: float | None, samples_per_s: float | None) -> dict:
    """Write model.safetensors, loss.png and train.json (rank 0); return train.json's content."""
    digest = _weights_digest(net)
    digests = [digest]
    if d.world > 1:
        digests = [None] * d.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            log.error("the model weights differ between ranks at the end of training: %s", digests)
    cuda = d.device.type == "cuda"
    summary = {
        "epochs": step / steps_per_epoch, "steps": step, "wall_time_s": wall_s,
        "gpu_hours": wall_s * d.world / 3600 if cuda else 0.0, "final_loss": final_loss,
        "peak_memory_bytes": peak_memory(d.device), "world_size": d.world, "device": device_name(d.device),
        "samples_per_s": samples_per_s, "mfu": mfu(fps, samples_per_s, d.device), "flops_per_sample": fps,
        "resumed_from_step": resumed_from, "requeues": ckpt.read_requeues(out_dir)["total"],
        "backend": cfg["train"]["backend"], "weights_sha256": digests,
    }
    if d.rank == 0:
        final_cfg = {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data_meta}
        ckpt.save_final(out_dir / "model.safetensors", ema, final_cfg, step)
        with atomic_path(out_dir / "loss.csv") as tmp:
            shutil.copyfile(out_dir / "checkpoints" / "loss.csv", tmp)
        plot_loss(out_dir / "loss.csv", out_dir / "loss.png")
        with atomic_path(out_dir / "train.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, outputs in %s", step, final_loss, out_dir)
    d.barrier()
    return summary
