"""Benchmarks that print their figures (`brainddpm bench data|train|eval`).

data: volumes/s of NIfTI load + preprocessing (what a loader without shards does) against
volumes/s read from HDF5 shards through ShardDataset, on the same images, per process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _data_cfg(target_shape) -> dict:
    return {
        "grid": {"shape": [181, 217, 181], "spacing": [1.0, 1.0, 1.0], "origin": [-90.0, -126.0, -72.0]},
        "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5},
        "target_shape": list(target_shape), "mask": None,
    }


def bench_data(n: int, target_shape, workdir: Path, codecs=("lzf",)) -> dict:
    from .dataset import ShardDataset
    from .demo import write_cohort
    from .nifti import preprocess, target_affine
    from .shards import write_shard

    workdir = Path(workdir)
    cohort = workdir / "cohort"
    paths = sorted(cohort.glob("*/sub-*/ses-*/anat/*_T1w.nii.gz"))
    if len(paths) < n:
        paths = write_cohort(n, seed=0, out=cohort, progress=True)
    paths = paths[:n]
    cfg = _data_cfg(target_shape)
    t0 = time.perf_counter()
    vols = [preprocess(p, cfg)[0] for p in paths]
    nifti_s = time.perf_counter() - t0
    results = {"n": n, "target_shape": list(target_shape), "nifti_vol_per_s": n / nifti_s, "codecs": {}}
    for codec in codecs:
        shard = workdir / f"bench-{codec}.h5"
        write_shard(shard, np.stack(vols), [{"subject": str(p)} for p in paths], target_affine(cfg),
                    compression=codec.split("-")[0], compression_level=int(codec.split("-")[1]) if "-" in codec else 1)
        ds = ShardDataset([shard])
        _ = [ds[i] for i in range(len(ds))]  # warm the page cache: we measure decoding, not the disk
        reps = max(1, 400 // n)
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(len(ds)):
                ds[i]
        shard_rate = reps * n / (time.perf_counter() - t0)
        results["codecs"][codec] = {"vol_per_s": shard_rate, "bytes_per_vol": shard.stat().st_size / n,
                                    "speedup": shard_rate / results["nifti_vol_per_s"]}
    return results


def print_data(res: dict) -> None:
    shape = "x".join(map(str, res["target_shape"]))
    print(f"brainddpm bench data: {res['n']} volumes, target {shape}, 1 process")
    print(f"  NIfTI load + preprocess : {res['nifti_vol_per_s']:8.2f} volumes/s")
    for codec, r in res["codecs"].items():
        print(f"  shards ({codec:>6})       : {r['vol_per_s']:8.1f} volumes/s  "
              f"({r['bytes_per_vol'] / 1e6:.2f} MB/volume)  ratio {r['speedup']:.0f}x")


def main(args) -> None:
    if args.what == "data":
        codecs = ("none", "lzf", "gzip-1", "gzip-4") if args.compare_codecs else ("lzf",)
        print_data(bench_data(args.n, args.target_shape, args.workdir, codecs))
