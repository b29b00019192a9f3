#!/usr/bin/env python3
"""Issue 9 in one GPU sitting: ceilings, training throughput (the loop vs the MONAI tutorial step), the
levers one at a time, a kernel-time profile, data time per step, sampling rates and an all-reduce.

    PYTHONUNBUFFERED=1 python docs/experiments/gpu_session.py --out OUT [--budget-s 420] [--sections ...]
    python docs/experiments/gpu_session.py --out /tmp/t --tiny          # CPU check of every code path

Writes OUT/gpu_session.json (every figure, after each section) and OUT/gpu_session.md (the tables), and
OUT/profile.txt (the kernel-time breakdown). Each section runs inside try/except: an error or an
out-of-memory is recorded as that row's figure and the next section runs. Sections are skipped, and say
so, once less than their estimated time is left of --budget-s. Nothing here is extrapolated except where
a row says "derived" (per-step times multiplied by a step count).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from brainddpm.bench.suite import _preset  # noqa: E402
from brainddpm.bench.train import Levers, _cleanup, bench_baseline, bench_levers, bench_train, build_step, is_oom  # noqa: E402
from brainddpm.config import deep_merge  # noqa: E402
from brainddpm.models.diffusion import build_model  # noqa: E402
from brainddpm.training.perf import device_name, flops_per_sample, synchronize  # noqa: E402

START = time.monotonic()
DATE = "2026-11-22"
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def elapsed() -> float:
    return time.monotonic() - START


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


class Session:
    def __init__(self, out: Path, budget_s: float, tiny: bool, batch: int):
        self.out, self.budget_s, self.tiny = out, budget_s, tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        out.mkdir(parents=True, exist_ok=True)
        self.cfg = _preset("paper")
        if tiny:  # every code path, CPU-sized
            self.cfg = deep_merge(self.cfg, {"model": {"channels": [8, 8, 16], "num_res_blocks": 1,
                                                       "num_head_channels": 16, "norm_num_groups": 8},
                                             "train": {"num_workers": 2}})
            self.shape = (16, 24, 16)
        else:
            self.shape = tuple(self.cfg["data"]["target_shape"])
        self.cfg["launch"]["gpus_per_node"] = 1 if self.cuda else 0
        self.batch = batch
        self.deadline: float | None = None
        self.flops: int | None = None
        self.ceiling: float | None = None
        self.res: dict = {"date": DATE, "shape": list(self.shape), "tiny": tiny, "sections": {},
                          "command": " ".join([Path(sys.executable).name, *sys.argv])}

    def left(self) -> float:
        if self.deadline:
            return self.deadline - time.time()
        return self.budget_s - elapsed()

    def save(self) -> None:
        (self.out / "gpu_session.json").write_text(json.dumps(self.res, indent=1, default=str))

    def run(self, name: str, fn, need_s: float = 0.0):
        if self.left() < need_s:
            log(f"SKIP {name}: {self.left():.0f} s left of the budget, needs ~{need_s:.0f} s")
            self.res["sections"][name] = {"skipped": f"budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
            self.save()
            return None
        log(f"BEGIN {name}")
        t0 = time.monotonic()
        try:
            r = fn()
        except Exception as exc:  # keep going: the other sections still measure
            traceback.print_exc()
            r = {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "oom": is_oom(exc)}
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.res["sections"][name] = r
        self.save()
        log(f"END {name} ({time.monotonic() - t0:.1f} s)")
        return r

    # ---- sections ------------------------------------------------------------------------------------

    def env(self) -> dict:
        import monai

        r = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "device": device_name(self.device),
             "hostname_cpus": os.cpu_count()}
        try:
            import deepspeed

            r["deepspeed"] = deepspeed.__version__
        except Exception as exc:  # recorded, not fatal
            r["deepspeed"] = f"not importable: {exc}"
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            r.update(sm_count=p.multi_processor_count, memory_bytes=p.total_memory,
                     capability=f"{p.major}.{p.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     tf32_cudnn=torch.backends.cudnn.allow_tf32)
        return r

    def ceilings(self) -> dict:
        """bf16 matrix product 8192^3 on random data, and a device-to-device copy, CUDA-event timed."""
        if not self.cuda:
            n, reps = 256, 3
        else:
            n, reps = 8192, 20
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        synchronize(self.device)
        t = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        synchronize(self.device)
        mm_s = (time.perf_counter() - t) / reps
        tflops = 2 * n ** 3 / mm_s / 1e12
        assert torch.isfinite(c).all()
        self.ceiling = tflops * 1e12
        nbytes = (2 << 30) if self.cuda else (64 << 20)
        src = torch.empty(nbytes // 4, device=self.device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        synchronize(self.device)
        t = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        synchronize(self.device)
        copy_s = (time.perf_counter() - t) / 10
        return {"matmul_n": n, "matmul_bf16_tflops": tflops, "copy_bytes": nbytes,
                "copy_tb_per_s_read_plus_write": 2 * nbytes / copy_s / 1e12}

    def flop_count(self) -> dict:
        """perf.flops_per_sample (what the loop and bench report), and the same count split by operator."""
        from torch.utils.flop_counter import FlopCounterMode

        torch.manual_seed(0)
        net = build_model(self.cfg["model"]).to(self.device).train()
        total = flops_per_sample(net, self.shape, self.device, True)
        counter = FlopCounterMode(display=False)
        x = torch.rand(1, 1, *self.shape, device=self.device)
        t = torch.randint(0, 1000, (1,), device=self.device)
        with counter:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = net(x, timesteps=t)
            out.float().square().mean().backward()
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        cats = {"convolution": 0, "matmul": 0, "attention": 0, "other": 0}
        for op, v in by_op.items():
            if "conv" in op:
                cats["convolution"] += v
            elif "attention" in op:
                cats["attention"] += v
            elif any(k in op for k in ("mm", "addmm", "bmm", "baddbmm", "linear")):
                cats["matmul"] += v
            else:
                cats["other"] += v
        self.flops = total
        params = sum(p.numel() for p in net.parameters())
        return {"flops_per_sample": total, "tflop_per_sample": total / 1e12, "parameters": params,
                "by_operator": by_op, "by_category": cats}

    def project(self, backend: str = "deepspeed") -> dict:
        """The loop's own Engine (bench_train), bf16, with the loop's EMA update."""
        cfg = deep_merge(self.cfg, {"train": {"backend": backend, "precision": "bf16" if self.cuda else "fp32"}})
        _cleanup(self.device)
        r = bench_train(cfg, self.shape, self.batch, steps=4 if self.tiny else 20, warmup=2 if self.tiny else 5,
                        ema=True)
        r["variant"] = f"brain-ddpm loop ({backend} engine, {r['precision']}, EMA)"
        return r

    def baseline(self, **kw) -> dict:
        return bench_baseline(self.cfg, self.shape, self.batch, steps=4 if self.tiny else 20, device=self.device,
                              warmup=2 if self.tiny else 5, flops=self.flops, amp=kw.pop("amp", True), **kw)

    def lever(self, levers: Levers, batch: int | None = None, steps: int | None = None, warmup: int | None = None):
        return bench_levers(self.cfg, self.shape, batch or self.batch, steps or (3 if self.tiny else 8), self.device,
                            levers, warmup=warmup or (1 if self.tiny else 3), flops=self.flops)

    def levers(self) -> dict:
        base = Levers()
        rows = {}

        def go(key, lv, **kw):
            if not self.tiny and self.left() < 30:
                rows[key] = {"variant": lv.label(), "batch": kw.get("batch") or self.batch,
                             "skipped": f"budget: {self.left():.0f} s left"}
                log(f"  SKIP lever {key}: budget")
                return
            log(f"  lever {key}: {lv.label()} batch {kw.get('batch') or self.batch}")
            try:
                rows[key] = self.lever(lv, **kw)
            except Exception as exc:
                rows[key] = {"variant": lv.label(), "batch": kw.get("batch") or self.batch,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}", "oom": is_oom(exc)}
                if not is_oom(exc):
                    traceback.print_exc()
            finally:
                _cleanup(self.device)
            r = rows[key]
            log(f"    -> {r.get('samples_per_s', float('nan')):.3f} samples/s, "
                f"peak {r.get('peak_memory_bytes', 0) / 2**30:.1f} GiB {r.get('error', '')}")
            self.res["sections"]["levers"] = rows
            self.save()

        go("bf16", base)
        go("bf16_b1", base, batch=1)
        go("fp32_b1", Levers(precision="fp32"), batch=1)
        go("channels_last", Levers(channels_last=True))
        go("math_attention", Levers(flash=False))
        go("fused_adam", Levers(fused_adam=True))
        go("no_ema", Levers(ema=False))
        go("no_cudnn_benchmark", Levers(cudnn_benchmark=False))
        big = {} if self.tiny else {"steps": 5, "warmup": 2}  # 2-4x the work per step: fewer steps
        go("bf16_2x_batch", base, batch=2 * self.batch, **big)
        go("checkpointing_2x_batch", Levers(checkpointing=True), batch=2 * self.batch, **big)
        go("checkpointing_4x_batch", Levers(checkpointing=True), batch=4 * self.batch, **big)
        return rows

    def best_eager(self) -> Levers:
        """The eager levers that helped by more than 2% over the bf16 row, combined."""
        rows = self.res["sections"].get("levers") or {}
        ref = (rows.get("bf16") or {}).get("samples_per_s")
        if not ref:
            return Levers()

        def helped(key):
            r = rows.get(key) or {}
            return (r.get("samples_per_s") or 0) > 1.02 * ref

        return Levers(channels_last=helped("channels_last"), fused_adam=helped("fused_adam"),
                      flash=not helped("math_attention"))

    def combined(self) -> dict:
        lv = self.best_eager()
        return {"levers": lv.label(), **self.lever(lv)}

    def compiled(self) -> dict:
        lv = Levers(**{**self.best_eager().__dict__, "compile": True})
        r = self.lever(lv, warmup=2 if self.tiny else 3)
        return r

    def profile(self) -> dict:
        """Kernel time by category over 2 profiled steps of the loop's step (bf16, batch as the main rows)."""
        from torch.profiler import ProfilerActivity, profile

        lv = self.best_eager() if self.res["sections"].get("levers") else Levers()
        _cleanup(self.device)
        prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cuda
        try:
            step, net, _, _ = build_step(self.cfg, self.shape, self.batch, self.device, lv)
            for _ in range(1 if self.tiny else 4):
                step()
            synchronize(self.device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            nsteps = 2
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(nsteps):
                    step()
                synchronize(self.device)
            wall = (time.perf_counter() - t0) / nsteps
        finally:
            torch.backends.cudnn.benchmark = prev
        kernels = {}
        for evt in prof.key_averages():
            dev_type = str(getattr(evt, "device_type", ""))
            if "CUDA" not in dev_type:
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0)
            kernels[evt.key] = kernels.get(evt.key, 0.0) + us / 1e6 / nsteps
        cats: dict[str, float] = {}
        for name, s in kernels.items():
            c = kernel_category(name)
            cats[c] = cats.get(c, 0.0) + s
        total = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
        lines = [f"profile of the loop's step ({lv.label()}), batch {self.batch}, {device_name(self.device)}, "
                 f"{DATE}", f"wall time per step {wall * 1e3:.1f} ms, GPU kernel time per step {total * 1e3:.1f} ms",
                 "", "category                      ms/step   share of kernel time"]
        for c, s in sorted(cats.items(), key=lambda kv: -kv[1]):
            lines.append(f"{c:28s} {s * 1e3:9.1f}   {100 * s / total if total else 0:5.1f} %")
        lines += ["", "top kernels (ms/step, category, name)"]
        for name, s in top:
            lines.append(f"{s * 1e3:9.2f}  {kernel_category(name):22s} {name[:160]}")
        try:
            lines += ["", prof.key_averages().table(sort_by="self_cuda_time_total" if self.cuda else "self_cpu_time_total",
                                                     row_limit=30, max_name_column_width=90)]
        except Exception as exc:  # the table is a convenience
            lines.append(f"(key_averages table failed: {exc})")
        (self.out / "profile.txt").write_text("\n".join(lines) + "\n")
        fl = self.res["sections"].get("flops") or {}
        conv_flops = (fl.get("by_category") or {}).get("convolution")
        conv_s = cats.get("convolution (cuDNN)", 0.0)
        return {"levers": lv.label(), "wall_s_per_step": wall, "kernel_s_per_step": total,
                "by_category_s_per_step": cats, "top_kernels": top[:15],
                "conv_tflops_while_in_conv_kernels": conv_flops * self.batch / conv_s / 1e12
                if conv_flops and conv_s else None}

    def data(self) -> dict:
        """DataLoader from lzf HDF5 shards (the loop's settings) feeding the loop's step: data vs compute time."""
        from torch.utils.data import DataLoader

        from brainddpm.data.dataset import ShardDataset
        from brainddpm.data.nifti import grid_affine
        from brainddpm.data.shards import write_shard

        n, per_shard = (8, 4) if self.tiny else (32, 8)
        tmp = Path(tempfile.mkdtemp(prefix="bd-shards-"))
        rng = np.random.default_rng(0)
        idx = np.indices(self.shape).astype(np.float32)
        c = (np.array(self.shape) - 1) / 2
        files = []
        for s in range(n // per_shard):
            vols = []
            for _ in range(per_shard):  # brain-like: an ellipsoid with smooth texture and noise, zero outside
                r = sum(((idx[k] - c[k]) / (self.shape[k] * rng.uniform(0.36, 0.45))) ** 2 for k in range(3))
                v = (0.5 + 0.3 * np.sin(idx[0] / 3 + rng.uniform(0, 6)) * np.cos(idx[1] / 5)
                     + rng.normal(0, 0.05, self.shape)) * (r < 1)
                vols.append(np.clip(v, 0, 1).astype(np.float32))
            path = tmp / f"shard-{s:04d}.h5"
            write_shard(path, np.stack(vols), [{"subject": f"s{s}-{i}"} for i in range(per_shard)],
                        grid_affine(self.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
            files.append(path)
        mb_per_vol = sum(f.stat().st_size for f in files) / n / 1e6
        workers = int(self.cfg["train"]["num_workers"])
        ds = ShardDataset(files)
        loader = DataLoader(ds, batch_size=self.batch, shuffle=True, num_workers=workers, pin_memory=self.cuda,
                            drop_last=True, persistent_workers=workers > 0)
        it = iter(loader)
        next(it)  # worker start-up is not the steady state
        t = time.perf_counter()
        got = 0
        for _ in range(2):
            for xb in it:
                got += len(xb)
            it = iter(loader)
        loader_vol_s = got / (time.perf_counter() - t)

        _cleanup(self.device)
        torch.backends.cudnn.benchmark = self.cuda
        step, _, _, _ = build_step(self.cfg, self.shape, self.batch, self.device, Levers())
        data_s, compute_s = [], []
        it = iter(loader)
        nsteps = 3 if self.tiny else 14
        for i in range(nsteps + 3):
            t0 = time.perf_counter()
            try:
                xb = next(it)
            except StopIteration:
                it = iter(loader)
                xb = next(it)
            xb = xb.to(self.device, non_blocking=True)
            t1 = time.perf_counter()
            step(xb)
            synchronize(self.device)
            t2 = time.perf_counter()
            if i >= 3:
                data_s.append(t1 - t0)
                compute_s.append(t2 - t1)
        return {"volumes": n, "mb_per_volume_lzf": mb_per_vol, "num_workers": workers, "pin_memory": self.cuda,
                "loader_alone_volumes_per_s": loader_vol_s, "batch": self.batch,
                "data_wait_s_per_step_mean": float(np.mean(data_s)), "data_wait_s_per_step_max": float(np.max(data_s)),
                "compute_s_per_step_mean": float(np.mean(compute_s)),
                "data_share": float(np.sum(data_s) / (np.sum(data_s) + np.sum(compute_s)))}

    def sampling(self) -> dict:
        """The sampler's own denoise(): seconds per denoising step per batch, then variants, then DDIM-50 in full."""
        from brainddpm.models.diffusion import build_ddim, build_scheduler
        from brainddpm.sampling.sample import denoise

        torch.manual_seed(0)
        net = build_model(self.cfg["model"]).to(self.device).eval()
        full = build_scheduler(self.cfg["scheduler"])
        full.set_timesteps(full.num_train_timesteps)
        all_t = full.timesteps.clone()
        k = 2 if self.tiny else 6
        rows = {}
        prev = torch.backends.cudnn.benchmark

        def per_step(model, batch, bench, label):
            torch.backends.cudnn.benchmark = bench
            full.timesteps = all_t[:2]
            denoise(model, full, list(range(batch)), self.shape, self.device)  # warm-up (autotuning, allocator)
            synchronize(self.device)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            full.timesteps = all_t[:k]
            t = time.perf_counter()
            denoise(model, full, list(range(batch)), self.shape, self.device)
            synchronize(self.device)
            s = (time.perf_counter() - t) / k
            r = {"variant": label, "batch": batch, "s_per_step": s, "volumes_per_s_per_step": batch / s,
                 "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None}
            log(f"    sampling {label} batch {batch}: {s:.3f} s/step, {batch / s:.2f} volume-steps/s")
            return r

        try:
            batches = [1, 2, 4] if self.tiny else [1, 4, 8, 16]
            sweep = {}
            for b in batches:
                try:
                    sweep[b] = per_step(net, b, False, "as shipped (bf16, NCDHW, cudnn.benchmark off)")
                except Exception as exc:
                    sweep[b] = {"batch": b, "error": f"{type(exc).__name__}: {str(exc)[:200]}", "oom": is_oom(exc)}
                    _cleanup(self.device)
                    if is_oom(exc):
                        break
            rows["sweep"] = sweep
            ok = {b: r for b, r in sweep.items() if "s_per_step" in r}
            best_b = max(ok, key=lambda b: ok[b]["volumes_per_s_per_step"])
            rows["best_batch"] = best_b
            rows["bench"] = per_step(net, best_b, True, "bf16, NCDHW, cudnn.benchmark on")
            net_cl = net.to(memory_format=torch.channels_last_3d)
            rows["bench_cl"] = per_step(net_cl, best_b, True, "bf16, channels_last_3d, cudnn.benchmark on")
            variants = {"as shipped": (sweep[best_b], False), "bench": (rows["bench"], True),
                        "bench_cl": (rows["bench_cl"], True)}
            fastest = min(variants, key=lambda v: variants[v][0]["s_per_step"])
            rows["fastest"] = fastest
            best_step = variants[fastest][0]["s_per_step"]
            # DDIM-50 in full, as shipped, at the config's sample.batch (4): checks that s/step x steps holds
            torch.backends.cudnn.benchmark = False
            net = net.to(memory_format=torch.contiguous_format)
            b_full = 2 if self.tiny else int(self.cfg["sample"]["batch"])
            ddim = build_ddim(self.cfg["scheduler"], 2 if self.tiny else 50)
            t = time.perf_counter()
            denoise(net, ddim, list(range(b_full)), self.shape, self.device)
            synchronize(self.device)
            ddim_s = time.perf_counter() - t
            n_ddim = len(ddim.timesteps)
            rows["ddim50_full"] = {"variant": "as shipped", "batch": b_full, "steps": n_ddim, "seconds": ddim_s,
                                   "volumes_per_s": b_full / ddim_s, "s_per_step": ddim_s / n_ddim}
            rows["ddim50_derived"] = {"variant": fastest, "batch": best_b, "seconds": best_step * 50,
                                      "volumes_per_s": best_b / (best_step * 50),
                                      "how": f"measured s/step over {k} steps x 50 (derived)"}
            rows["ddpm1000_derived"] = {"variant": fastest, "batch": best_b, "seconds": best_step * 1000,
                                        "volumes_per_s": best_b / (best_step * 1000),
                                        "how": f"measured s/step over {k} DDPM steps x 1000 (derived)"}
            b4 = sweep.get(4, {})
            rows["wall_86"] = wall_86(best_b, best_step, b4.get("s_per_step"))
        finally:
            torch.backends.cudnn.benchmark = prev
        return rows

    def sampling_compiled(self) -> dict:
        from brainddpm.models.diffusion import build_scheduler
        from brainddpm.sampling.sample import denoise

        s = self.res["sections"].get("sampling") or {}
        b = s.get("best_batch") or (2 if self.tiny else 8)
        torch.manual_seed(0)
        net = build_model(self.cfg["model"]).to(self.device).eval()
        if s.get("fastest") == "bench_cl":
            net = net.to(memory_format=torch.channels_last_3d)
        model = torch.compile(net)
        sch = build_scheduler(self.cfg["scheduler"])
        sch.set_timesteps(sch.num_train_timesteps)
        all_t = sch.timesteps.clone()
        torch.backends.cudnn.benchmark = self.cuda
        t = time.perf_counter()
        sch.timesteps = all_t[:2]
        denoise(model, sch, list(range(b)), self.shape, self.device)
        synchronize(self.device)
        compile_s = time.perf_counter() - t
        k = 2 if self.tiny else 6
        sch.timesteps = all_t[:k]
        t = time.perf_counter()
        denoise(model, sch, list(range(b)), self.shape, self.device)
        synchronize(self.device)
        per = (time.perf_counter() - t) / k
        torch._dynamo.reset()
        return {"batch": b, "compile_and_first_2_steps_s": compile_s, "s_per_step": per,
                "volumes_per_s_per_step": b / per}

    def allreduce(self) -> dict:
        """NCCL all_reduce of a gradient-sized fp32 tensor in a group of ONE process: a lower bound only."""
        import torch.distributed as dist

        params = (self.res["sections"].get("flops") or {}).get("parameters") or 47_500_000
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl" if self.cuda else "gloo", rank=0, world_size=1)
        t = torch.randn(params, device=self.device)
        for _ in range(3):
            dist.all_reduce(t)
        synchronize(self.device)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        synchronize(self.device)
        s = (time.perf_counter() - t0) / reps
        return {"elements": params, "bytes": params * 4, "world_size": dist.get_world_size(),
                "backend": dist.get_backend(), "seconds": s, "note": "world of 1: no data crosses a link; lower bound"}


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "softmax")):
        return "attention"
    if any(k in n for k in ("nchwtonhwc", "nhwctonchw", "transpose", "permute")):
        return "layout conversion"
    if re.search(r"conv(?!ert)", n) or any(k in n for k in ("xmma", "cudnn", "implicit", "dgrad", "wgrad",
                                                             "fprop")):
        return "convolution (cuDNN)"
    if "gemm" in n or "cublas" in n or "cutlass" in n:
        return "matmul (cuBLAS)"
    if "group_norm" in n or "groupnorm" in n or "rowwisemoments" in n or "computefusedparams" in n \
            or "norm" in n:
        return "group norm"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer / EMA / clip"
    if "reduce" in n:
        return "reductions"
    if "copy" in n or "memcpy" in n or "memset" in n or "cat" in n:
        return "copies"
    if "triton" in n:
        return "triton (compiled)"
    if "elementwise" in n or "vectorized" in n or "unrolled" in n:
        return "elementwise"
    return "other"


def wall_86(best_b: int, best_s_per_step: float, b4_s_per_step: float | None) -> dict:
    """Derived: denoising wall time of 86 volumes when J jobs (one GPU each) share the batches (model
    loading and writing excluded)."""
    out = {}
    for label, b, step in (("best", best_b, best_s_per_step), ("as shipped, sample.batch 4", 4, b4_s_per_step)):
        if step is None:
            continue
        batches = math.ceil(86 / b)
        out[label] = {"batch": b, "batches": batches, "s_per_step": step, "jobs": {}}
        for jobs in (1, 2, 4, 8):
            per_job = math.ceil(batches / jobs)
            out[label]["jobs"][jobs] = {"ddpm1000_s": per_job * 1000 * step, "ddim50_s": per_job * 50 * step}
    return out


def fmt_rate(r: dict | None) -> str:
    if not r or "samples_per_s" not in r:
        return "–"
    return f"{r['samples_per_s']:.3f}"


def markdown(s: Session) -> str:
    sec = s.res["sections"]
    env = sec.get("env") or {}
    ceil = sec.get("ceilings") or {}
    fl = sec.get("flops") or {}
    peak = next((v for k, v in BF16_PEAK.items() if k in str(env.get("device"))), None)
    cm = ceil.get("matmul_bf16_tflops")
    lines = [f"# GPU session {DATE}: {env.get('device')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, MONAI {env.get('monai')}, "
             f"DeepSpeed {env.get('deepspeed')}; shape {'x'.join(map(str, s.shape))}; command `{s.res['command']}`", ""]
    if ceil and "error" not in ceil:
        lines += [f"bf16 matmul {ceil['matmul_n']}^3: **{cm:.0f} TFLOP/s**; device copy "
                  f"{ceil['copy_tb_per_s_read_plus_write']:.2f} TB/s (read + write)", ""]
    if fl and "error" not in fl:
        lines += [f"FLOPs per volume (fwd+bwd, perf.flops_per_sample): **{fl['tflop_per_sample']:.2f} TFLOP**, "
                  f"{fl['parameters'] / 1e6:.1f} M parameters; by category (TFLOP): "
                  + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in fl["by_category"].items()), ""]

    def row(r):
        if not isinstance(r, dict) or not r:
            return None
        if "error" in r or "skipped" in r:
            return f"| {r.get('variant', '?')} | {r.get('batch', '')} | {r.get('error') or r.get('skipped')} | | | | |"
        mfu_peak = r["tflops_per_s"] * 1e12 / peak if peak and r.get("tflops_per_s") else None
        mfu_ceil = r["tflops_per_s"] / cm if cm and r.get("tflops_per_s") else None
        pct = (lambda x: f"{100 * x:.1f} %" if x is not None else "–")
        return (f"| {r['variant']} | {r['batch']} | {r['samples_per_s']:.3f} | "
                f"{r['tflops_per_s']:.0f} | {pct(mfu_peak)} | {pct(mfu_ceil)} | "
                f"{r['peak_memory_bytes'] / 2**30:.1f} GiB |" if r.get("tflops_per_s") is not None else
                f"| {r['variant']} | {r['batch']} | {r['samples_per_s']:.3f} | – | – | – | "
                f"{r['peak_memory_bytes'] / 2**30:.1f} GiB |")

    head = ["| variant | batch | samples/s | TFLOP/s | MFU (989 peak) | of measured matmul | peak memory |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["## Training: the loop vs the MONAI tutorial step", ""] + head
    for key in ("project", "project_accelerate", "baseline_fp16", "baseline_fp16_flash", "tutorial_fp32"):
        r = sec.get(key)
        if r:
            lines.append(row(r) or "")
    proj, base = sec.get("project") or {}, sec.get("baseline_fp16") or {}
    if proj.get("samples_per_s") and base.get("samples_per_s"):
        lines += ["", f"loop / tutorial step: **{proj['samples_per_s'] / base['samples_per_s']:.2f}x**"]
    lines += ["", "## Levers (the loop's step, one at a time)", ""] + head
    for key, r in (sec.get("levers") or {}).items():
        if isinstance(r, dict):
            lines.append(row(r) or "")
    for key in ("combined", "compiled", "compiled_2x_batch"):
        r = sec.get(key)
        if r:
            lines.append(row({**r, "variant": f"{key}: {r.get('variant', '')}"}) or "")
    pr = sec.get("profile") or {}
    if pr.get("by_category_s_per_step"):
        lines += ["", f"## Profile ({pr['levers']}), ms per step: wall {pr['wall_s_per_step'] * 1e3:.0f}, "
                      f"kernels {pr['kernel_s_per_step'] * 1e3:.0f}", ""]
        lines += [f"- {c}: {v * 1e3:.1f} ms ({100 * v / pr['kernel_s_per_step']:.1f} %)"
                  for c, v in sorted(pr["by_category_s_per_step"].items(), key=lambda kv: -kv[1])]
        if pr.get("conv_tflops_while_in_conv_kernels"):
            lines.append(f"- convolution FLOPs / convolution kernel time: "
                         f"{pr['conv_tflops_while_in_conv_kernels']:.0f} TFLOP/s")
    d = sec.get("data") or {}
    if "loader_alone_volumes_per_s" in d:
        lines += ["", "## Data", "", f"loader alone {d['loader_alone_volumes_per_s']:.1f} volumes/s "
                  f"({d['num_workers']} workers, pinned {d['pin_memory']}, {d['mb_per_volume_lzf']:.2f} MB/volume lzf); "
                  f"in the loop: data wait {d['data_wait_s_per_step_mean'] * 1e3:.1f} ms/step (max "
                  f"{d['data_wait_s_per_step_max'] * 1e3:.1f}) vs compute {d['compute_s_per_step_mean'] * 1e3:.0f} "
                  f"ms/step ({100 * d['data_share']:.2f} % of the step)"]
    sm = sec.get("sampling") or {}
    if sm.get("sweep"):
        lines += ["", "## Sampling (sample.denoise, bf16)", "", "| variant | batch | s/step | volume-steps/s | peak |",
                  "|---|---:|---:|---:|---:|"]
        for r in [*sm["sweep"].values(), sm.get("bench"), sm.get("bench_cl")]:
            if r and "s_per_step" in r:
                pk = r.get("peak_memory_bytes")
                lines.append(f"| {r['variant']} | {r['batch']} | {r['s_per_step']:.3f} | "
                             f"{r['volumes_per_s_per_step']:.2f} | {pk / 2**30 if pk else 0:.1f} GiB |")
            elif r:
                lines.append(f"| {r.get('variant', '')} | {r.get('batch')} | {r.get('error')} | | |")
        if sm.get("ddim50_full"):
            dd = sm["ddim50_full"]
            lines += ["", f"DDIM-50 in full ({dd['variant']}, batch {dd['batch']}): {dd['seconds']:.1f} s "
                      f"({dd['s_per_step']:.3f} s/step), {dd['volumes_per_s']:.3f} volumes/s"]
            for key in ("ddim50_derived", "ddpm1000_derived"):
                dp = sm[key]
                lines += [f"{key} ({dp['variant']}, {dp['how']}): {dp['seconds']:.1f} s per batch of {dp['batch']}, "
                          f"**{dp['volumes_per_s']:.4f} volumes/s**"]
            for label, w in sm.get("wall_86", {}).items():
                lines += [f"86 volumes, {label} (batch {w['batch']}), derived: " + "; ".join(
                    f"{j} job(s) DDPM {v['ddpm1000_s'] / 60:.1f} min, DDIM {v['ddim50_s'] / 60:.2f} min"
                    for j, v in w["jobs"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-session-out")))
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this (s)")
    p.add_argument("--resume-json", nargs="*", default=[],
                   help="gpu_session.json files of an earlier call in the same sitting: their sections are kept "
                        "(the first that exists is read), and the FLOP count and lever rows are reused")
    p.add_argument("--deadline", type=float, help="unix time after which no section starts (overrides --budget-s)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch of the main rows (the reference: 2)")
    p.add_argument("--tiny", action="store_true", help="tiny model and shape on the CPU: checks every code path")
    p.add_argument("--sections", nargs="*", help="subset, in the order given (default: all)")
    args = p.parse_args(argv)
    s = Session(args.out, args.budget_s, args.tiny, args.batch)
    s.deadline = args.deadline
    for prev in map(Path, args.resume_json):
        if prev.exists():
            old = json.loads(prev.read_text())
            s.res["sections"].update(old.get("sections", {}))
            s.res["earlier_commands"] = [*old.get("earlier_commands", []), old.get("command")]
            s.flops = (s.res["sections"].get("flops") or {}).get("flops_per_sample")
            log(f"kept the sections of {prev}: {', '.join(old.get('sections', {}))}")
            break
    plan = [  # name, function, estimated seconds it needs on an H100 (the budget guard)
        ("env", s.env, 0), ("ceilings", s.ceilings, 5), ("flops", s.flop_count, 10),
        ("project", s.project, 40), ("baseline_fp16", lambda: s.baseline(), 30),
        ("baseline_fp16_flash", lambda: s.baseline(flash=True), 30),
        ("levers", s.levers, 150), ("profile", s.profile, 25), ("data", s.data, 40),
        ("sampling", s.sampling, 120), ("allreduce", s.allreduce, 5),
        ("combined", s.combined, 25), ("compiled", s.compiled, 200),
        ("compiled_2x_batch", lambda: s.lever(Levers(compile=True), batch=2 * s.batch,
                                              **({} if s.tiny else {"steps": 6, "warmup": 2})), 150),
        ("project_accelerate", lambda: s.project("accelerate"), 40),
        ("tutorial_fp32", lambda: s.baseline(amp=False), 40),
        ("sampling_compiled", s.sampling_compiled, 150),
    ]
    chosen = args.sections or [name for name, _, _ in plan]
    table = {name: (fn, need) for name, fn, need in plan}
    for name in chosen:
        fn, need = table[name]
        r = s.run(name, fn, 0 if args.tiny else need)
        if name == "project" and r and r.get("oom") and s.batch > 1:
            log("the main batch does not fit: every row at batch 1")
            s.batch = 1
            s.run(name, fn, 0 if args.tiny else need)
    md = markdown(s)
    (args.out / "gpu_session.md").write_text(md)
    try:  # a later call in the same sitting (the machine still warm) can --resume-json it
        Path("/tmp/gpu_session_last.json").write_text(json.dumps(s.res, indent=1, default=str))
    except OSError:
        pass
    print(md, flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
