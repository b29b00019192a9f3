"""Which device a job runs on, and how fast it runs there: shared by every stage that may use a GPU.

`claim_gpu` gives each of several processes on one machine (sampling or feature jobs that Snakemake
runs side by side) a GPU of its own, by a lock file per GPU; `pick_device` turns a config's `device` key
(auto, cpu, cuda) into a device. `resolve_performance` turns the `performance` config section (compile,
channels-last, bf16 GroupNorm: how fast a step runs, never what it computes beyond float rounding) into
a `Performance` for one device, for training (training/engine.py) and sampling alike.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from brainddpm.errors import BrainDDPMError

log = logging.getLogger(__name__)

_CLAIMED: dict[str, object] = {}  # lock name -> open lock file, held for the life of the process


def lock_first_free(names: list[str], lock_dir: Path) -> int | None:
    """Index of the first name whose lock file this call could lock (held until the process ends), or None."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        f = open(lock_dir / f"{name}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _CLAIMED[name] = f
        return i
    return None


def visible_gpus() -> int:
    """How many GPUs this process sees (CUDA_VISIBLE_DEVICES applies): what training on this machine can use."""
    return torch.cuda.device_count()


def claim_gpu(lock_dir: Path | None = None) -> torch.device:
    """A GPU that no other brainddpm process on this machine holds, locked until this process ends.

    Snakemake runs several GPU jobs at once on a multi-GPU workstation (`--resources gpu_jobs=N`) without
    telling them which GPU to use; each job takes the first free GPU among those its CUDA_VISIBLE_DEVICES
    shows (locks are keyed by the device's UUID, so differently masked jobs still agree). With more jobs
    than GPUs the extra jobs share cuda:0, with a warning.
    """
    n = torch.cuda.device_count()
    if n == 0:
        raise BrainDDPMError("a GPU was requested but none is visible")
    names = [f"gpu-{getattr(torch.cuda.get_device_properties(i), 'uuid', i)}" for i in range(n)]
    held = [i for i, name in enumerate(names) if name in _CLAIMED]
    if held:
        return torch.device("cuda", held[0])
    default = Path(tempfile.gettempdir()) / f"brainddpm-gpus-{os.getuid()}"  # per user: no foreign lock files
    lock_dir = Path(lock_dir or os.environ.get("BRAINDDPM_GPU_LOCKS") or default)
    index = lock_first_free(names, lock_dir)
    if index is None:
        log.warning("all %d GPUs are held by other brainddpm processes; sharing cuda:0", n)
        index = 0
    return torch.device("cuda", index)


def pick_device(name: str) -> torch.device:
    """sample.device → a device: a GPU no other brainddpm job on this machine holds (claim_gpu)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BrainDDPMError("sample.device is 'cuda' but no GPU is visible")
        return claim_gpu()
    return torch.device("cpu")


# What `auto` means on a CUDA device, key by key (measured: docs/benchmarks.md, "GPU round 2"); on a CPU
# `auto` is off for every key.
CUDA_DEFAULTS = {"compile": True, "channels_last": False, "low_precision_norm": False}


@dataclass(frozen=True)
class Performance:
    """How the step runs (never what it computes): the `performance` section resolved for one device."""
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    low_precision_norm: bool = False  # GroupNorm in bf16 under bf16 autocast (fp32 statistics inside)
    compile_backend: str = "inductor"  # torch.compile's backend (tests use a failing one)


EAGER = Performance()


def resolve_performance(section: dict | None, device: torch.device) -> Performance:
    """The `performance` section (validated by the schema) for `device`: `auto` is CUDA_DEFAULTS on a GPU and
    off on a CPU."""
    section = section or {}
    cuda = device.type == "cuda"

    def flag(key: str) -> bool:
        value = section.get(key, "auto")
        return (cuda and CUDA_DEFAULTS[key]) if value == "auto" else bool(value)

    return Performance(compile=flag("compile"), compile_mode=section.get("compile_mode", "default"),
                       channels_last=flag("channels_last"),
                       low_precision_norm=flag("low_precision_norm"))
