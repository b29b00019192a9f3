"""Benchmarks that print their figures (`brainddpm bench data|train|eval|sampling|gpu`).

data:     volumes/s of NIfTI load + preprocessing (what a loader without shards does) against
          volumes/s read from HDF5 shards through ShardDataset, on the same images, per process.
train:    steps/s, samples/s, MFU and peak memory of the UNet of a preset on this device, through the
          training engine; on a GPU side by side with the MONAI 3D DDPM tutorial's step (bench/train.py).
eval:     wall time of one point evaluation of every metric (Grams, MS-SSIM matrices, features)
          against the 1000 bootstrap resamples that index them.
sampling: wall time of DDPM (all steps) against DDIM on the same trained model.
gpu:      this node measured for the configured model, section by section under deadlines (bench/node.py).
"""

from __future__ import annotations

import json
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
    from brainddpm.data.dataset import ShardDataset
    from brainddpm.data.demo import write_cohort
    from brainddpm.data.nifti import preprocess, target_affine
    from brainddpm.data.shards import write_shard

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


def checkout_config_dir() -> Path:
    """config/ of the checkout this package runs from (its presets: config.yaml, demo.yaml, latent.yaml ...)."""
    root = Path(__file__).resolve().parents[3] / "config"
    if not (root / "config.yaml").exists():
        raise SystemExit(f"config presets not found under {root} (run from a checkout)")
    return root


def _preset(name: str) -> dict:
    from brainddpm.config import deep_merge

    root = checkout_config_dir()
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text())
    if name != "paper":
        cfg = deep_merge(cfg, yaml.safe_load((root / f"{name}.yaml").read_text()))
    return cfg


def _pct(x) -> str:
    return "n/a (no known peak for this device)" if x is None else f"{100 * x:.1f} %"


def environment(device) -> dict:
    """Device and library versions, for a record that machines can read."""
    import platform

    import monai
    import torch

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "monai": monai.__version__}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # recorded, not fatal
        env["deepspeed"] = f"not importable: {exc}"
    return env


def bench_train_main(args) -> None:
    import torch

    from brainddpm.bench.train import bench_baseline, bench_train
    from brainddpm.fileio import atomic_path

    cfg = _preset(args.preset)
    shape = args.target_shape or cfg["data"]["target_shape"]
    overrides = {k: v for k, v in (("backend", args.backend), ("precision", args.precision)) if v}
    cfg["train"].update(overrides)
    word = {"auto": "auto", "true": True, "false": False}
    performance = dict(cfg.get("performance") or {})
    for key in ("compile", "channels_last", "low_precision_norm"):
        if getattr(args, key) is not None:
            performance[key] = word[getattr(args, key)]
    if args.compile_mode:
        performance["compile_mode"] = args.compile_mode
    cfg["performance"] = performance
    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    cfg["launch"]["gpus_per_node"] = 1 if cuda else 0  # one process on one device
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else None
    r = bench_train(cfg, shape, args.batch, args.steps, memory_cap_bytes=cap)
    on = [k for k, v in r["performance"].items() if v is True]
    print(f"brainddpm bench train: preset {args.preset}, target {'x'.join(map(str, shape))}, batch {args.batch}, "
          f"{args.steps} steps, {r['device']}, {r['backend']}, {r['precision']}, "
          f"{', '.join(on) or 'eager'} (warm-up {r['warmup_s']:.0f} s, compiling included)")
    print(f"  parameters        : {r['parameters'] / 1e6:.1f} M")
    print(f"  FLOPs per sample  : {r['flops_per_sample'] / 1e12:.3f} TFLOP (forward + backward)")
    print(f"  steps/s           : {r['steps_per_s']:.3f}")
    print(f"  samples/s         : {r['samples_per_s']:.3f}")
    print(f"  achieved          : {r['tflops_per_s']:.2f} TFLOP/s")
    print(f"  MFU               : {_pct(r['mfu'])}")
    print(f"  peak memory       : {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    baseline = None
    if cuda and args.baseline == "tutorial":  # side by side: the MONAI 3D DDPM tutorial's step, same model/shape/batch
        baseline = bench_baseline(cfg, shape, args.batch, args.steps, torch.device("cuda"),
                                  flops=r["flops_per_sample"])
        print(f"  baseline: {baseline['variant']}")
        print(f"    samples/s       : {baseline['samples_per_s']:.3f}   "
              f"(this loop: {r['samples_per_s'] / baseline['samples_per_s']:.2f}x)")
        print(f"    MFU             : {_pct(baseline['mfu'])}")
        print(f"    peak memory     : {baseline['peak_memory_bytes'] / 2**30:.2f} GiB")
    if args.json:
        record = {"environment": environment(torch.device("cuda" if cuda else "cpu")), "preset": args.preset,
                  "target_shape": list(shape), "loop": r, "baseline": baseline,
                  "loop_vs_baseline": r["samples_per_s"] / baseline["samples_per_s"] if baseline else None}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
        print(f"  written           : {args.json}")


def bench_eval(n: int, shape, kernel: int, scales: int, n_boot: int, jobs: int, device: str) -> dict:
    """Point evaluation of all metrics (features included) against n_boot resamples, same inputs."""
    from brainddpm.evaluation import bootstrap, metrics
    from brainddpm.evaluation.medicalnet import build_network, extract_features

    rng = np.random.default_rng(0)
    idx = np.indices(shape).astype(np.float32)
    c = (np.array(shape) - 1) / 2
    r = sum(((idx[k] - c[k]) / (shape[k] * 0.4)) ** 2 for k in range(3)) < 1
    real = (rng.random((n, 1, *shape), dtype=np.float32) * r).astype(np.float32)
    syn = (rng.random((n, 1, *shape), dtype=np.float32) * r).astype(np.float32)
    t0 = time.perf_counter()
    kxx, kyy, kxy = metrics.gram_matrices(real, syn)
    box = metrics.brain_bbox([real, syn], min_size=metrics.msssim_min_size(kernel, scales))
    ms = {f"{k}{s}": metrics.pairwise_msssim(v if not s else metrics.crop(v, box), kernel, scales, 1.0, device=device)
          for k, v in (("real", real), ("syn", syn)) for s in ("", "_bbox")}
    net = build_network("resnet10").to(device).eval()  # random weights: timing only, never reported as FID
    fr, fs = extract_features(real, net, device=device), extract_features(syn, net, device=device)
    inputs = bootstrap.prepare_inputs(kxx, kyy, kxy, int(np.prod(shape)), ms["real"], ms["syn"], ms["real_bbox"],
                                      ms["syn_bbox"], fr, fs)
    bootstrap.point_estimates(inputs)
    point_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunks = [bootstrap.resample_chunk(inputs, a, b, 1) for a, b in bootstrap.chunk_bounds(n_boot, jobs)]
    bootstrap.gather(bootstrap.point_estimates(inputs), chunks)
    boot_s = time.perf_counter() - t0
    return {"n": n, "shape": list(shape), "point_s": point_s, "bootstrap_s": boot_s, "n_boot": n_boot,
            "ratio": boot_s / point_s, "device": device}


def bench_sampling(checkpoint: Path, n: int, ddim_steps: int, device: str) -> dict:
    from brainddpm.models.final import load_final
    from brainddpm.sampling.sample import denoise, make_scheduler

    dev = torch_device(device)
    model, config = load_final(checkpoint, dev)
    shape = tuple(config["data"]["target_shape"])
    out = {"checkpoint": str(checkpoint), "n": n, "device": str(dev)}
    warm = make_scheduler(config, "ddim", 2)  # CUDA context, cuDNN autotuning: not charged to the first sampler
    denoise(model, warm, list(range(n)), shape, dev)
    for sampler in ("ddpm", "ddim"):
        sch = make_scheduler(config, sampler, ddim_steps)
        t0 = time.perf_counter()
        denoise(model, sch, list(range(n)), shape, dev)
        if dev.type == "cuda":
            import torch

            torch.cuda.synchronize()
        out[sampler] = {"steps": len(sch.timesteps), "seconds": time.perf_counter() - t0}
    out["ratio"] = out["ddpm"]["seconds"] / out["ddim"]["seconds"]
    return out


def torch_device(name: str):
    from brainddpm.device import pick_device

    return pick_device(name)


def main(args) -> None:
    if args.what == "data":
        codecs = ("none", "lzf", "gzip-1", "gzip-4") if args.compare_codecs else ("lzf",)
        print_data(bench_data(args.n, args.target_shape, args.workdir, codecs))
    elif args.what == "train":
        bench_train_main(args)
    elif args.what == "gpu":
        from brainddpm.bench.node import main as bench_gpu_main

        bench_gpu_main(args)
    elif args.what == "eval":
        r = bench_eval(args.n, args.shape, args.kernel, args.scales, args.bootstrap, args.jobs,
                       str(torch_device(args.device)))
        print(f"brainddpm bench eval: {r['n']} real + {r['n']} synthetic volumes of {'x'.join(map(str, r['shape']))}"
              f" on {r['device']}")
        print(f"  one point evaluation of all metrics : {r['point_s']:8.2f} s (Grams, 4 MS-SSIM matrices, features)")
        print(f"  {r['n_boot']} bootstrap resamples          : {r['bootstrap_s']:8.2f} s")
        print(f"  ratio                               : {r['ratio']:8.3f}x (target < 2x)")
    elif args.what == "sampling":
        r = bench_sampling(args.checkpoint, args.n, args.ddim_steps, args.device)
        print(f"brainddpm bench sampling: {r['n']} volumes, {r['checkpoint']}, {r['device']}")
        for s in ("ddpm", "ddim"):
            print(f"  {s}: {r[s]['steps']:5d} steps {r[s]['seconds']:9.2f} s")
        print(f"  DDPM/DDIM wall-time ratio: {r['ratio']:.1f}x")
