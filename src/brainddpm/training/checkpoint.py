"""Resumable training checkpoints (the final model file is models/final.py).

A resumable checkpoint is a folder ``<root>/step-00000500/`` holding

    model.pt              rank 0: {"model": state_dict, "ema": state_dict}
    optimizer.pt          rank 0: the optimizer state when every rank holds all of it (DDP, ZeRO-0), or
    optimizer-rank00003.pt  one per rank when DeepSpeed ZeRO-1/2 partitions it
    rng-rank00003.pt      one per rank: python, numpy, torch CPU, CUDA and noise-generator states
    meta.json             step, epoch, samples seen, lr, config, world size, backend, ...
    manifest.json         written last: size and sha256 of every other file

Every rank writes its files into ``step-00000500.tmp/``; rank 0 then writes the manifest and renames
the folder. A folder without the ``.tmp`` suffix therefore was complete when written, and its manifest
tells later whether a file was truncated or altered since. `find_latest` skips (and logs) checkpoints that
do not match their manifest. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: a file
holding any pickled Python object other than tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from brainddpm import __version__
from brainddpm.errors import CheckpointError
from brainddpm.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

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
        torch.cuda.set_rng_state(cuda if isinstance(cuda, torch.Tensor) else cuda[torch.cuda.current_device() % len(cuda)])
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


# ---- requeue counter, shared by launch (which increments it) and train (which reports it) ----

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
