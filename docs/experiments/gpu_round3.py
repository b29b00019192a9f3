#!/usr/bin/env python3
"""GPU round 3 in one sitting: what issue 21 still lacks after round 2. The 1 mm latent model (autoencoder
training, latent UNet training compiled and eager, decode time per volume) and (c), the compile mode
max-autotune-no-cudagraphs beside the default mode and the MONAI tutorial step at the reference shape.

    PYTHONUNBUFFERED=1 python docs/experiments/gpu_round3.py --out OUT --deadline UNIX [--sections ...]
    python docs/experiments/gpu_round3.py --out /tmp/r3 --tiny          # CPU check of every code path

Every training row goes through the training loop's own `Engine` (`bench.train.bench_train`: DeepSpeed,
bf16, EMA), the autoencoder with its own objective (`kind="autoencoder"`), so a row's figure is what a
training run with that setting gets. The latent rows use config/config.yaml + config/latent.yaml, as
`snakemake --configfile config/config.yaml config/latent.yaml` does. Reuses the sitting harness of
docs/experiments/gpu_session.py: a budget guard per section, the JSON saved after every section, errors and
out-of-memory recorded as the row's figure. Sections whose compiling has no known bound (max-autotune, the
compiled autoencoder) run in a child process that is killed when the budget ends, so a runaway compile
costs its section and not the sitting. Writes OUT/gpu_round3.json and OUT/gpu_round3.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import gpu_session  # noqa: E402
from gpu_session import Session, log  # noqa: E402

from brainddpm.bench.suite import _preset  # noqa: E402
from brainddpm.bench.train import _cleanup, bench_baseline, bench_train, is_oom  # noqa: E402
from brainddpm.config import deep_merge  # noqa: E402
from brainddpm.models.autoencoder import build_autoencoder, decode_latents, latent_shape  # noqa: E402
from brainddpm.models.diffusion import build_model  # noqa: E402
from brainddpm.training.perf import autocast, flops_per_sample, peak_memory, synchronize  # noqa: E402

DATE = time.strftime("%Y-%m-%d")
GiB = 2**30
A100_CAP = 64 * 10**9  # LEONARDO's A100 64 GB (decimal GB, as sold)
LAST_JSON = Path("/tmp/gpu_round3_last.json")  # a next call on the still-warm machine resumes from it
# CPU-sized stand-in of the 1 mm preset: every code path of the latent sections, in seconds on 2 cores
TINY_LATENT = {
    "data": {"target_shape": [24, 32, 24]},
    "model": {"channels": [8, 8, 16], "attention_levels": [False, True, True], "num_res_blocks": 1,
              "num_head_channels": 8, "norm_num_groups": 8},
    "autoencoder": {"channels": [4, 8, 8], "attention_levels": [False, False, False], "num_res_blocks": 1,
                    "norm_num_groups": 4, "pad_multiple": 16, "adversarial": {"channels": 4, "layers": 2}},
    "train": {"micro_batch": 2},
    "sample": {"batch": 2},
}
TINY_ROI = [4, 4, 4]
PRESET_ROI = [12, 14, 12]  # config/latent.yaml's example window (latent voxels): 96x112x96 image voxels


class Round3(Session):
    def __init__(self, out: Path, budget_s: float, tiny: bool, batch: int, child: bool = False):
        super().__init__(out, budget_s, tiny, batch)
        self.res["date"] = DATE
        self.child = child
        self.latent = _preset("latent")
        if tiny:
            self.latent = deep_merge(self.latent, TINY_LATENT)
        self.latent["launch"]["gpus_per_node"] = 1 if self.cuda else 0
        ae_cfg = self.latent["autoencoder"]
        self.image_shape = tuple(self.latent["data"]["target_shape"])
        self.latent_shape = latent_shape(ae_cfg, self.image_shape)  # (channels, d, h, w)
        self.cap = A100_CAP if self.cuda else None
        self.res["latent"] = {"image_shape": list(self.image_shape), "latent_shape": list(self.latent_shape),
                              "autoencoder": ae_cfg, "model": self.latent["model"]}

    def save(self) -> None:
        text = json.dumps(self.res, indent=1, default=str)
        (self.out / "gpu_round3.json").write_text(text)
        if not self.child:
            LAST_JSON.write_text(text)

    def steps(self, gpu: int) -> int:
        return 2 if self.tiny else gpu

    # ---- training rows through the engine ---------------------------------------------------------------

    def engine(self, label: str, cfg: dict, shape, batch: int, performance: dict, steps: int, warmup: int,
               **kw) -> dict:
        """One bench_train row with `performance` laid over "all off", bf16 on a GPU (fp32 on the CPU)."""
        cfg = deep_merge(cfg, {"train": {"backend": "deepspeed", "precision": "bf16" if self.cuda else "fp32"},
                               "performance": {"compile": False, "channels_last": False,
                                               "low_precision_norm": False, "compile_mode": "default",
                                               **performance}})
        _cleanup(self.device)
        r = bench_train(cfg, shape, batch, steps=self.steps(steps), warmup=1 if self.tiny else warmup, ema=True,
                        memory_cap_bytes=kw.pop("cap", None), **kw)
        r.pop("kernels_s_per_step", None)
        r["variant"] = label
        log(f"    {label}: {r['samples_per_s']:.3f} samples/s, MFU {r['mfu']}, peak "
            f"{r['peak_memory_bytes'] / GiB:.1f} GiB, warm-up {r['warmup_s']:.0f} s")
        return r

    def autoencoder(self, label: str, compile: bool = False, adversarial_now: bool = False) -> dict:
        """AutoencoderKL training at the preset (whole volumes padded, use_checkpoint as set, micro-batch of
        autoencoder.train) under the 64 GB cap; `adversarial_now`: the discriminator active from step 0 (the
        preset starts it at step 2000, so the plain row is the first 2000 steps)."""
        cfg = self.latent
        if adversarial_now:
            cfg = deep_merge(cfg, {"autoencoder": {"adversarial": {"start_step": 0}}})
        batch = int(cfg["autoencoder"]["train"]["micro_batch"])
        return self.engine(label, cfg, self.image_shape, batch, {"compile": compile}, steps=6,
                           warmup=3 if compile else 2, kind="autoencoder", cap=self.cap)

    def latent_unet(self, label: str, compile: bool) -> dict:
        """The latent DiffusionModelUNet on 3x24x28x24 latents at the preset's micro-batch (8)."""
        channels, *shape = self.latent_shape
        return self.engine(label, self.latent, shape, int(self.latent["train"]["micro_batch"]),
                           {"compile": compile}, steps=15, warmup=3, channels=channels, cap=self.cap)

    def pixel(self, label: str, mode: str | None) -> dict:
        """The reference UNet at 84x128x84, micro-batch 2; `mode` None: eager, else that compile mode."""
        performance = {"compile": mode is not None, "compile_mode": mode or "default"}
        return self.engine(label, self.cfg, self.shape, self.batch, performance, steps=15, warmup=3)

    def tutorial(self) -> dict:
        """The MONAI tutorial step (fp16, GradScaler) on the same UNet, shape and batch: the baseline."""
        if not self.flops:
            torch.manual_seed(0)
            net = build_model(self.cfg["model"]).to(self.device).train()
            self.flops = flops_per_sample(net, self.shape, self.device, self.cuda)
            del net
        r = bench_baseline(self.cfg, self.shape, self.batch, steps=self.steps(15), device=self.device,
                           warmup=1 if self.tiny else 3, flops=self.flops)
        return {**r, "variant": "MONAI tutorial step (fp16, GradScaler)"}

    # ---- decoding ------------------------------------------------------------------------------------------

    def decode(self) -> dict:
        """decode_latents per volume on random weights (time does not depend on them): whole volume and
        windows of decode.roi, bf16 autocast; and fp32 at batch 1, as sample_part calls it (one volume at a
        time), and at sample.batch (how it decoded before 2026-12-01), each under the 64 GB cap."""
        torch.manual_seed(0)
        net = build_autoencoder(self.latent["autoencoder"]).to(self.device).eval()
        roi = TINY_ROI if self.tiny else PRESET_ROI
        sample_batch = int(self.latent["sample"]["batch"])
        variants = [("whole_bf16_b1", 1, True, None), ("window_bf16_b1", 1, True, roi),
                    ("whole_fp32_b1", 1, False, None), (f"whole_fp32_b{sample_batch}", sample_batch, False, None)]
        rows = {}
        for key, batch, bf16, window in variants:
            if self.left() < 15 and not self.tiny:
                rows[key] = {"skipped": "budget"}
                continue
            rows[key] = self.decode_row(net, batch, bf16, window)
            log(f"    decode {key}: {rows[key].get('s_per_volume', rows[key].get('error'))}")
            self.res["sections"]["decode"] = rows
            self.save()
        return rows

    def decode_row(self, net: torch.nn.Module, batch: int, bf16: bool, roi) -> dict:
        decode_cfg = {"roi": roi, "overlap": 0.25, "sw_batch_size": 1} if roi else None
        row = {"batch": batch, "precision": "bf16" if bf16 and self.cuda else "fp32", "roi": roi,
               "memory_cap_bytes": self.cap}
        reps = 1 if self.tiny else 3
        self.set_cap(self.cap)
        try:
            _cleanup(self.device)
            z = torch.randn(batch, *self.latent_shape, device=self.device)
            with autocast(self.device, bf16 and self.cuda):
                t = time.perf_counter()
                out = decode_latents(net, z, 1.0, self.image_shape, decode_cfg)  # warm-up: cuDNN's autotuning
                synchronize(self.device)
                row["first_s"] = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(reps):
                    out = decode_latents(net, z, 1.0, self.image_shape, decode_cfg)
                synchronize(self.device)
            elapsed = (time.perf_counter() - t) / reps
            assert tuple(out.shape) == (batch, 1, *self.image_shape) and bool(torch.isfinite(out).all())
            row.update(s_per_batch=elapsed, s_per_volume=elapsed / batch, peak_memory_bytes=peak_memory(self.device))
        except Exception as exc:  # an out-of-memory is the row's figure
            row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}", oom=is_oom(exc))
        finally:
            self.set_cap(None)
            _cleanup(self.device)
        return row

    def set_cap(self, cap: int | None) -> None:
        if self.cuda:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, self.device)

    # ---- sections with no known bound on their compiling: a child process, killed at the budget's end ----

    def in_child(self, name: str) -> dict:
        """Run section `name` in a fresh process of this script; past the budget the process group is killed
        and the row says so (how long compiling took is then the figure: longer than that)."""
        timeout = None if self.tiny else max(30.0, self.left() - 5)
        with tempfile.TemporaryDirectory(prefix=f"round3-{name}-") as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", tmp, "--child", "--sections", name,
                   "--batch", str(self.batch)] + (["--tiny"] if self.tiny else [])
            t = time.monotonic()
            child = subprocess.Popen(cmd, start_new_session=True)
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # the child and the compile workers it started
                child.wait()
                return {"error": f"not finished within {timeout:.0f} s (the sitting's budget): killed",
                        "timed_out": True, "child_wall_s": time.monotonic() - t}
            wall = time.monotonic() - t
            path = Path(tmp) / "gpu_round3.json"
            if not path.exists():
                return {"error": f"child process exited with {child.returncode} before writing its JSON",
                        "child_wall_s": wall}
            row = json.loads(path.read_text())["sections"].get(name) or {"error": "child wrote no row"}
        return {**row, "child_wall_s": wall, "ran_in_child_process": True}


def tiny_compile_backend() -> None:
    """--tiny on the CPU: default-mode compiling goes through dynamo's aot_eager backend (the same capture of
    the graph and the engine's compile path, without inductor's C++ code generation, minutes on 2 cores);
    max-autotune keeps inductor, whose mode it is."""
    import brainddpm.bench.train as bench

    resolve = bench.resolve_performance

    def resolve_tiny(section, device):
        performance = resolve(section, device)
        if performance.compile and performance.compile_mode == "default":
            return dataclasses.replace(performance, compile_backend="aot_eager")
        return performance

    bench.resolve_performance = resolve_tiny


def plan(s: Round3) -> list:
    """(name, function, seconds it needs on the H200: the budget guard), most wanted first. The estimates
    come from round 2's measured warm-ups (52-80 s per compiled job, 3-25 s eager) and the CPU-counted
    FLOPs of the latent preset (docs/benchmarks.md, "GPU round 3: predictions")."""
    child = (lambda name: lambda: s.in_child(name)) if not s.child else None
    mode = "max-autotune-no-cudagraphs"
    return [
        ("env", s.env, 0),
        ("ceilings", s.ceilings, 5),  # round 2: 2 s
        # 1 volume of 192x224x192 per step, ~1 s each: DS init, FLOP count, cuDNN autotuning, 2 + 6 steps
        ("ae_eager", lambda: s.autoencoder("autoencoder, eager (preset, discriminator not yet active)"), 45),
        # a 441 M UNet compiled: round 2's 52-80 s warm-up, then 3 + 15 steps of ~0.1 s
        ("latent_compiled", lambda: s.latent_unet("latent UNet, compiled (the GPU default)", True), 100),
        ("decode", s.decode, 30),  # 4 variants x (1 + 3) decodes of ~0.1-2 s
        ("latent_eager", lambda: s.latent_unet("latent UNet, eager", False), 25),
        ("baseline", s.tutorial, 25),  # round 2: 20 tutorial steps of 0.41 s + build
        ("compiled", lambda: s.pixel("engine, compiled (default mode)", "default"), 95),
        # round 2 predicted 3-5x the default's compiling; unbounded, so a child killed at the budget's end
        ("max_autotune", child("max_autotune") if child else lambda: s.pixel(f"engine, compiled {mode}", mode), 150),
        ("ae_disc", lambda: s.autoencoder("autoencoder, eager, discriminator active", adversarial_now=True), 45),
        ("ae_compiled", child("ae_compiled") if child else
         lambda: s.autoencoder("autoencoder, compiled (the GPU default)", compile=True), 150),
    ]


def fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(s: Round3) -> str:
    sec = s.res["sections"]
    env, ceil = sec.get("env") or {}, sec.get("ceilings") or {}
    lines = [f"# GPU round 3, {DATE}: {env.get('device')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, MONAI {env.get('monai')}, "
             f"DeepSpeed {env.get('deepspeed')}; pixel {'x'.join(map(str, s.shape))}, latent preset image "
             f"{'x'.join(map(str, s.image_shape))}, latents {'x'.join(map(str, s.latent_shape))}; "
             f"`{s.res['command']}`", ""]
    if ceil.get("matmul_bf16_tflops"):
        lines += [f"bf16 matmul: {ceil['matmul_bf16_tflops']:.0f} TFLOP/s; copy "
                  f"{ceil.get('copy_tb_per_s_read_plus_write', 0):.2f} TB/s", ""]
    base = (sec.get("baseline") or {}).get("samples_per_s")
    lines += ["| row | variant | batch | samples/s | MFU (989) | vs tutorial | TFLOP/sample | peak memory | warm-up s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("ae_eager", "ae_disc", "ae_compiled", "latent_compiled", "latent_eager", "baseline", "compiled",
                "max_autotune"):
        r = sec.get(key)
        if not isinstance(r, dict):
            continue
        if "samples_per_s" not in r:
            lines.append(f"| {key} | {r.get('variant', '')} | | {r.get('error') or r.get('skipped')} | | | | | |")
            continue
        ratio = r["samples_per_s"] / base if base and key in ("baseline", "compiled", "max_autotune") else None
        mfu = r.get("mfu")
        lines.append(f"| {key} | {r.get('variant')} | {r['batch']} | {r['samples_per_s']:.3f} | "
                     f"{fmt(mfu and 100 * mfu, '.1f', ' %')} | {fmt(ratio, '.2f', 'x')} | "
                     f"{fmt((r.get('flops_per_sample') or 0) / 1e12 or None, '.3g')} | "
                     f"{r['peak_memory_bytes'] / GiB:.1f} GiB | {fmt(r.get('warmup_s'), '.0f')} |")
    dec = sec.get("decode") or {}
    if isinstance(dec, dict) and dec and "error" not in dec and "skipped" not in dec:
        lines += ["", "| decode | batch | precision | window (latent voxels) | s per volume | first call s | peak memory |",
                  "|---|---:|---|---|---:|---:|---:|"]
        for key, r in dec.items():
            figure = fmt(r.get("s_per_volume"), ".3f") if "s_per_volume" in r else r.get("error") or r.get("skipped")
            peak = r.get("peak_memory_bytes")
            lines.append(f"| {key} | {r.get('batch', '')} | {r.get('precision', '')} | {r.get('roi') or 'whole'} | "
                         f"{figure} | {fmt(r.get('first_s'), '.2f')} | {fmt(peak and peak / GiB, '.1f', ' GiB')} |")
    elif dec:
        lines += ["", f"decode: {dec.get('error') or dec.get('skipped')}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--deadline", type=float, help="unix time after which no section starts")
    p.add_argument("--batch", type=int, default=2, help="micro-batch of the pixel rows (the reference: 2)")
    p.add_argument("--tiny", action="store_true", help="tiny networks and shapes on the CPU: every code path")
    p.add_argument("--resume-json", type=Path, help="gpu_round3.json of an earlier call of this sitting")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one section, for in_child
    p.add_argument("--sections", nargs="*")
    args = p.parse_args(argv)
    s = Round3(args.out, args.budget_s, args.tiny, args.batch, child=args.child)
    if args.tiny:
        tiny_compile_backend()
    s.deadline = args.deadline
    if args.resume_json and args.resume_json.exists():
        old = json.loads(args.resume_json.read_text())
        s.res["sections"].update(old.get("sections", {}))
        s.res["earlier_commands"] = [*old.get("earlier_commands", []), old.get("command")]
    table = {name: (fn, need) for name, fn, need in plan(s)}
    for name in args.sections or list(table):
        fn, need = table[name]
        done = s.res["sections"].get(name)
        if isinstance(done, dict) and done and not ({"skipped", "error"} & set(done)):
            log(f"KEEP {name}: measured in an earlier call of this sitting")
            continue
        s.run(name, fn, 0 if args.tiny else need)
    if args.child:
        return 0
    md = markdown(s)
    (args.out / "gpu_round3.md").write_text(md)
    print(md, flush=True)
    log("done")
    return 0


gpu_session.DATE = DATE

if __name__ == "__main__":
    raise SystemExit(main())
