"""PyTorch Dataset over the HDF5 shards of one split.

Works with DataLoader workers (each worker opens the files lazily on first use; open handles are
never pickled) and with DistributedSampler (it is a plain map-style dataset). Optionally verifies
each volume's checksum as it is read, or loads the whole split into memory once.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from brainddpm.data.shards import check_volume, open_shard, read_meta, split_files


class ShardDataset(Dataset):
    """Volumes of a split: every item is the pair (volume, condition vector), the volume a float32 tensor of
    shape (1, D, H, W) in [0, 1], the condition vector a float32 tensor of shape (1, dim): a row of
    `conditions` when it is set (an (N, 1, dim) array, conditioning.CovariateEncoding.vectors), else of
    shape (1, 0) (an unconditional run: no condition).
    """

    def __init__(self, shards, verify: bool = False, cache: bool = False):
        """`shards`: a split folder holding index.json, or a list of shard files."""
        self.conditions: np.ndarray | None = None
        self.files = split_files(shards) if isinstance(shards, (str, Path)) else [Path(p) for p in shards]
        self.verify = verify
        self.meta = []
        self._where = []  # (file index, row in file)
        for fi, path in enumerate(self.files):
            rows = read_meta(path)
            self.meta += rows
            self._where += [(fi, r) for r in range(len(rows))]
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        self._cache = self._load_all() if cache else None

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _file(self, fi: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if fi not in self._handles:
            self._handles[fi] = open_shard(self.files[fi])
        return self._handles[fi]

    def _read(self, i: int) -> np.ndarray:
        fi, row = self._where[i]
        vol = self._file(fi)["images"][row]
        if self.verify:
            check_volume(self.files[fi], row, vol, self.meta[i]["checksum"])
        return vol

    def _load_all(self) -> np.ndarray:
        out = None
        for i in range(len(self)):
            vol = self._read(i)
            if out is None:
                out = np.empty((len(self), *vol.shape), dtype=vol.dtype)
            out[i] = vol
        self.close()
        return out if out is not None else np.empty((0,), dtype=np.float32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        vol = self._cache[i] if self._cache is not None else self._read(i)
        x = torch.from_numpy(np.asarray(vol, dtype=np.float32))
        if self.conditions is None:
            return x, torch.zeros(1, 0)  # no condition
        return x, torch.from_numpy(self.conditions[i])

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
