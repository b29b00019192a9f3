"""Checkpoints: one `Checkpointer` saves and restores one `TrainState`; nothing else reads or writes a
checkpoint folder.

Resume is exact: the data order is a DistributedSampler permutation per epoch, and a resumed run skips
the micro-batches already done in its epoch; the noise and timesteps come from a per-rank generator
whose state is checkpointed with everything else. Exact means bit-for-bit on the CPU; on GPUs cuDNN's
autotuned kernels make it exact up to float non-determinism. A checkpoint from another run (another model,
schedule, seed, optimiser setting or training set) is refused, never mixed in (`Checkpointer.restore`).

A resumable checkpoint is a folder ``<root>/step-00000500/`` holding

    model.pt              rank 0: {"model": state_dict, "ema": state_dict}
    optimizer.pt          rank 0: the optimizer state when every rank holds all of it (DDP, ZeRO-0), or
    optimizer-rank00003.pt  one per rank when DeepSpeed ZeRO-1/2 partitions it
    discriminator.pt      rank 0, with the adversarial loss: {"model": state_dict, "optimizer": state_dict}
    rng-rank00003.pt      one per rank: python, numpy, torch CPU, CUDA and noise-generator states
    meta.json             step, epoch, samples seen, lr, config, world size, backend, ...
    manifest.json         written last: size and sha256 of every other file

Every rank writes its files into ``step-00000500.tmp/``; rank 0 then writes the manifest and renames
the folder. A folder without the ``.tmp`` suffix therefore was complete when written, and its manifest
tells later whether a file was truncated or altered since. `find_latest` skips (and logs) checkpoints that
do not match their manifest. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a file
holding any pickled Python object other than tensors and plain containers is refused, never executed.
The final model file is models/final.py's.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from brainddpm import __version__
from brainddpm.config import is_conditioned, scheduler_section
from brainddpm.errors import CheckpointError
from brainddpm.fileio import sha256_file
from brainddpm.training.engine import RunPlan
from brainddpm.training.objectives import Discriminator
from brainddpm.training.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """One process's training state: what a checkpoint holds and a resume restores. The network, the engine's
    optimizer and the discriminator are restored in place (the engine holds them); the rest is replaced."""
    net: torch.nn.Module  # the bare network, whose weights are saved and averaged
    ema: dict[str, torch.Tensor]  # fp32 EMA of the weights
    generator: torch.Generator  # this rank's noise, timesteps, patch corners, condition dropping
    optimizer: Any  # the engine's (torch's, or DeepSpeed's ZeRO optimizer)
    discriminator: Discriminator | None = None  # the adversarial loss's network and its optimizer
    step: int = 0  # optimizer steps done
    started_at: float = field(default_factory=time.time)  # this job's start (time.time())
    wall_before_s: float = 0.0  # training time of earlier jobs of this run
    resumed_from: int | None = None
    last_loss: float | None = None

    def wall_time_s(self) -> float:
        return self.wall_before_s + time.time() - self.started_at


# train.* keys that change the result: a checkpoint made with other values is not resumed
RESULT_KEYS = ("lr", "betas", "weight_decay", "ema_decay", "grad_clip", "backend", "precision")


class Checkpointer:
    """Saves and restores the `TrainState` of a run in `root` (the run's checkpoints/ folder), every rank its part.

    `sections`: the config sections a checkpoint must share to be resumed (the task's); `index_sha256`: the
    training split's index.json, which must be the same too, as must `base_sha256`, the base model's file of
    a fine-tuning run (finetune.py)."""

    def __init__(self, root: Path, cfg: dict, kind: str, runtime: Runtime, plan: RunPlan, index_sha256: str,
                 sections: tuple[str, ...] = ("model", "scheduler", "seed"), base_sha256: str | None = None) -> None:
        self.root, self.cfg, self.kind, self.runtime, self.plan = Path(root), cfg, kind, runtime, plan
        self.index_sha256, self.sections, self.base_sha256 = index_sha256, sections, base_sha256

    def save(self, state: TrainState) -> Path:
        """Write `state` as the checkpoint of step `state.step` (collectively: every rank calls this)."""
        rank, train_cfg = self.runtime.rank, self.cfg["train"]
        files = {rank_file("rng", rank): rng_state(state.generator)}
        if is_partitioned(state.optimizer):
            files[rank_file("optimizer", rank)] = optimizer_state(state.optimizer)
        elif rank == 0:
            files["optimizer.pt"] = optimizer_state(state.optimizer)
        if rank == 0:
            files["model.pt"] = {"model": state.net.state_dict(), "ema": state.ema}
            if state.discriminator is not None:
                files["discriminator.pt"] = state.discriminator.state_dict()
        plan = self.plan
        meta = {"epoch": state.step / plan.steps_per_epoch, "samples_seen": state.step * plan.samples_per_step,
                "lr": train_cfg["lr"], "world_size": self.runtime.world_size, "backend": train_cfg["backend"],
                "zero_stage": train_cfg["zero_stage"], "precision": plan.precision,
                "wall_time_s": state.wall_time_s(), "final_loss": state.last_loss, "config": self.cfg,
                "train_index_sha256": self.index_sha256, "kind": self.kind,
                **({"base_sha256": self.base_sha256} if self.base_sha256 else {})}
        return save(self.root, state.step, files, meta, rank=rank, keep_last=train_cfg["keep_last"],
                    barrier=self.runtime.barrier)

    def restore(self, state: TrainState) -> TrainState:
        """`state` resumed from the newest valid checkpoint (rank 0 finds it, hashing its files once, and tells the
        other ranks), or `state` itself when there is none. Refuses a checkpoint of another run."""
        found = -1
        if self.runtime.rank == 0 and (latest := find_latest(self.root)) is not None:
            found = read_meta(latest)["step"]
        found = _broadcast_int(found, self.runtime)
        if found < 0:
            return state
        path = self.root / f"step-{found:08d}"
        meta = read_meta(path)
        self._refuse_another_run(path, meta, state.optimizer)
        saved = load_file(path / "model.pt")
        state.net.load_state_dict(saved["model"])
        ema = {k: torch.empty_like(v).copy_(saved["ema"][k]) for k, v in state.ema.items()}
        optimizer_file = rank_file("optimizer", self.runtime.rank) if is_partitioned(state.optimizer) \
            else "optimizer.pt"
        load_optimizer_state(state.optimizer, load_file(path / optimizer_file))
        if state.discriminator is not None:
            if not (path / "discriminator.pt").exists():
                raise CheckpointError(f"{path} holds no discriminator: it was trained without the adversarial loss")
            state.discriminator.load_state_dict(load_file(path / "discriminator.pt"))
        generator = torch.Generator(device=state.generator.device)
        generator.set_state(state.generator.get_state())
        rng_file = path / rank_file("rng", self.runtime.rank)
        if rng_file.exists():
            set_rng_state(load_file(rng_file), generator)
        if self.runtime.rank == 0:
            log.info("resumed from %s (step %d)", path, meta["step"])
        return replace(state, ema=ema, generator=generator, step=meta["step"], resumed_from=meta["step"],
                       wall_before_s=meta["wall_time_s"], last_loss=meta.get("final_loss"))

    def _refuse_another_run(self, path: Path, meta: dict, optimizer: Any) -> None:
        """Only the budget (epochs, max_steps) and bookkeeping may change between a checkpoint and its resume:
        another model (the task's config `sections`), schedule, seed, optimiser setting or training set would
        silently mix two runs. A partitioned optimizer state needs the same number of processes."""
        cfg, old, world_size = self.cfg, meta["config"], self.runtime.world_size
        changed = [s for s in self.sections if _section(old, s) != _section(cfg, s)]
        if old.get("condition") != cfg.get("condition") and (is_conditioned(old) or is_conditioned(cfg)):
            changed.append("condition")
        changed += [f"train.{k}" for k in RESULT_KEYS if old["train"][k] != cfg["train"][k]]
        if meta.get("train_index_sha256", self.index_sha256) != self.index_sha256:
            changed.append("the training shards (index.json)")
        if meta.get("base_sha256") != self.base_sha256:
            changed.append("base model (finetune.init_from: its file's sha256)")
        if changed:
            raise CheckpointError(f"{path} was trained with a different {', '.join(changed)}; use another run "
                                  f"name, or delete {path.parent} to start afresh")
        if is_partitioned(optimizer) and meta["world_size"] != world_size:
            raise CheckpointError(f"{path} holds ZeRO-{meta['zero_stage']} optimizer state partitioned over "
                                  f"{meta['world_size']} processes; this run has {world_size}: resume "
                                  f"with {meta['world_size']}")
        if meta["world_size"] != world_size or any(old["train"][k] != cfg["train"][k]
                                                   for k in ("micro_batch", "grad_accum")):
            log.warning("resuming %s with another number of processes or batch layout: the data order and noise "
                        "differ from an uninterrupted run", path)


def _section(cfg: dict, name: str):
    """A config section as resuming compares it. The scheduler's: a DDPM's without `kind` and `rflow`
    (config.scheduler_section). The autoencoder's: without its `train` overrides (compared as
    train.*), without `use_checkpoint` (memory, not results: switching it on after running out of memory must
    resume), and a loss switched off (weight 0) compares equal whatever its other keys say."""
    value = cfg.get(name)
    if name == "finetune":  # a run from scratch compares equal whether or not its config has the section
        return value if value and value.get("init_from") else None
    if name == "scheduler" and isinstance(value, dict):
        return scheduler_section(value)
    if name == "autoencoder" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("train", "use_checkpoint")}
        for loss in ("adversarial", "perceptual"):
            if isinstance(value.get(loss), dict) and not value[loss].get("weight"):
                value[loss] = {"weight": 0}
    return value


def _broadcast_int(value: int, runtime: Runtime) -> int:
    if runtime.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.broadcast(t, 0)
    return int(t.item())


# ---- the folder format: written and read by the Checkpointer only ----

MANIFEST = "manifest.json"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rank_file(stem: str, rank: int) -> str:
    """Name of a per-rank file, e.g. ``rng-rank00003.pt``."""
    return f"{stem}-rank{rank:05d}.pt"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(root: Path, step: int, files: dict[str, Any], meta: dict | None, *, rank: int = 0,
         keep_last: int = 3, barrier: Callable[[], None] = lambda: None) -> Path:
    """Write one checkpoint collectively; every rank calls this with the files it owns.

    `files` maps file names to objects for `torch.save` (tensors, dicts, lists, numbers, strings only);
    rank 0 also passes `meta` (JSON). `barrier` synchronises the ranks (a no-op for one process).
    Returns the final folder; keeps the newest `keep_last` complete checkpoints.
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, obj in files.items():
        with open(tmp / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    barrier()
    if rank == 0:
        _fsync_write(tmp / META, json.dumps({**(meta or {}), "step": step}, indent=1).encode())
        entries = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        _fsync_write(tmp / MANIFEST, json.dumps({"code_version": __version__, "files": entries}, indent=1).encode())
        if final.exists():  # the same step saved again (e.g. a rerun after the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _candidates(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders (no ``.tmp`` suffix), newest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _prune(root: Path, keep_last: int) -> None:
    for _, path in _candidates(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob("step-*.tmp"):  # left behind by a run killed while writing
        shutil.rmtree(path, ignore_errors=True)


def verify(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be used, or None when it matches its manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (the checkpoint was never completed)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{path / MANIFEST} is unreadable ({exc})"
    for name, entry in entries.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != entry["bytes"]:
            return f"{f} has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
        if sha256_file(f) != entry["sha256"]:
            return f"{f} does not match its sha256 in the manifest (corrupt)"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest checkpoint under `root` that matches its manifest; unusable ones are logged and skipped."""
    for _, path in _candidates(Path(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_file(path: Path) -> Any:
    """`torch.load` with ``weights_only=True`` onto the CPU; refuses files holding pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refusing to load it: it holds a pickled Python object ({found.group(1)}), not only "
                "tensors and plain containers, and unpickling it could run arbitrary code. brainddpm never "
                "writes such files; delete it if you do not know where it came from."
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint file (corrupt, or not written by torch.save)") \
            from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


# ---- RNG states: converted to tensors and plain types so that weights_only loading accepts them ----

def rng_state(generator: torch.Generator | None = None) -> dict:
    """RNG states of this process: python, numpy, torch CPU, its current CUDA device (if any) and `generator`.

    Only the current device's CUDA state: a rank that saved every visible GPU's state could not be
    resumed where a process sees fewer GPUs (one GPU per task instead of the whole node).
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # checkpoints of earlier versions hold a list (one state per visible GPU): take this rank's device's
        own = cuda if isinstance(cuda, torch.Tensor) else cuda[torch.cuda.current_device() % len(cuda)]
        torch.cuda.set_rng_state(own)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ---- optimizer state, including DeepSpeed ZeRO-1/2 partitions, in a weights_only-safe form ----

def is_partitioned(optimizer: Any) -> bool:
    """True for a DeepSpeed ZeRO-1/2 optimizer, whose state differs from rank to rank."""
    return hasattr(optimizer, "single_partition_of_fp32_groups")


def optimizer_state(optimizer: Any) -> dict:
    """The optimizer state as tensors and plain types.

    For ZeRO-1/2 this is this rank's partition: the wrapped torch optimizer's state (over the flat fp32
    partitions) and the fp32 master partitions themselves. DeepSpeed's own `state_dict()` would hold
    pickled DeepSpeed objects (loss scaler, enums), which a weights_only load refuses.
    """
    if is_partitioned(optimizer):
        return {"kind": "zero", "partition_count": [int(c) for c in optimizer.partition_count],
                "base": optimizer.optimizer.state_dict(),
                "fp32_partitions": [t.detach().cpu().clone() for t in optimizer.single_partition_of_fp32_groups]}
    return {"kind": "torch", "state": optimizer.state_dict()}


def load_optimizer_state(optimizer: Any, saved: dict) -> None:
    """Restore `optimizer_state` output into a freshly built optimizer of the same layout.

    For ZeRO-1/2 the model weights must be loaded first (every rank holds the full bf16/fp32 weights);
    the fp32 master partitions are then overwritten from the checkpoint.
    """
    if is_partitioned(optimizer) != (saved["kind"] == "zero"):
        raise CheckpointError("the checkpoint's optimizer state does not match this run's backend/ZeRO stage")
    if saved["kind"] == "torch":
        optimizer.load_state_dict(saved["state"])
        return
    if [int(c) for c in optimizer.partition_count] != saved["partition_count"]:
        raise CheckpointError(
            f"ZeRO optimizer state was partitioned over {saved['partition_count']} processes, this run has "
            f"{list(optimizer.partition_count)}: resume with the same number of processes"
        )
    optimizer.optimizer.load_state_dict(saved["base"])
    for dst, src in zip(optimizer.single_partition_of_fp32_groups, saved["fp32_partitions"], strict=True):
        dst.data.copy_(src.to(dst.device, dst.dtype))
