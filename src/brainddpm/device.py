"""Which device a job runs on: shared by every stage that may use a GPU (training, sampling, evaluation).

`claim_gpu` gives each of several processes on one machine (sampling or feature jobs that Snakemake
runs side by side) a GPU of its own, by a lock file per GPU; `pick_device` turns a config's `device` key
(auto, cpu, cuda) into a device.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
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
    """sample.device → a device: a GPU no other brainddpm job on this machine holds (runtime.claim_gpu)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BrainDDPMError("sample.device is 'cuda' but no GPU is visible")
        return claim_gpu()
    return torch.device("cpu")

