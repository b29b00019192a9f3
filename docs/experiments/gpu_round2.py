#!/usr/bin/env python3
"""GPU round 2 in one sitting: the training engine's variants beside the MONAI tutorial step, the layout
check, the compiled sampler, and a kernel profile of the fastest variant.

    PYTHONUNBUFFERED=1 python docs/experiments/gpu_round2.py --out OUT --deadline UNIX [--sections ...]
    python docs/experiments/gpu_round2.py --out /tmp/t --tiny          # CPU check of every code path

Every training row goes through the training loop's own `Engine` (`bench.train.bench_train`, DeepSpeed,
bf16, EMA) with a `performance` section as a user would set it, so a row's figure is what that setting
gives a training run; the baseline is the MONAI 3D DDPM tutorial's step (`bench_baseline`: fp16 autocast,
GradScaler, as a user copies it) on the same UNet, shape and batch, in the same sitting. Reuses the
sitting harness of docs/experiments/gpu_session.py (budget guard per section, JSON after every section,
errors and out-of-memory recorded as the row's figure). Writes OUT/gpu_round2.json, OUT/gpu_round2.md,
OUT/profile.txt. Nothing is extrapolated except rows marked "derived" (per-step times x a step count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import gpu_session  # noqa: E402
from gpu_session import Session, log  # noqa: E402

from brainddpm.bench.train import _cleanup, bench_train  # noqa: E402
from brainddpm.config import deep_merge  # noqa: E402
from brainddpm.models.diffusion import build_model  # noqa: E402
from brainddpm.training.perf import synchronize  # noqa: E402

DATE = time.strftime("%Y-%m-%d")
GiB = 2**30
A100_CAP = 64 * 10**9  # LEONARDO's A100 64 GB (decimal GB, as sold)


class Round2(Session):
    def __init__(self, out: Path, budget_s: float, tiny: bool, batch: int):
        super().__init__(out, budget_s, tiny, batch)
        self.res["date"] = DATE

    def save(self) -> None:
        text = json.dumps(self.res, indent=1, default=str)
        (self.out / "gpu_round2.json").write_text(text)
        Path("/tmp/gpu_round2_last.json").write_text(text)  # a next call on the still-warm machine resumes it

    # ---- training through the engine ------------------------------------------------------------------

    def engine(self, label: str, performance: dict, batch: int | None = None, cap: int | None = None,
               steps: int | None = None) -> dict:
        cfg = deep_merge(self.cfg, {"train": {"backend": "deepspeed", "precision": "bf16" if self.cuda else "fp32"},
                                    "performance": {"compile": False, "channels_last": False,
                                                    "low_precision_norm": False, "compile_mode": "default",
                                                    **performance}})
        _cleanup(self.device)
        r = bench_train(cfg, self.shape, batch or self.batch, steps=steps or (3 if self.tiny else 15),
                        warmup=2 if self.tiny else 3, ema=True, memory_cap_bytes=cap, profile_steps=2)
        r["variant"] = label
        kernels = r.pop("kernels_s_per_step") or {}
        categories: dict[str, float] = {}
        for name, sec in kernels.items():
            c = gpu_session.kernel_category(name)
            categories[c] = categories.get(c, 0.0) + sec
        r["kernel_s_per_step"] = sum(kernels.values())
        r["kernel_categories_s_per_step"] = categories
        r["top_kernels"] = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
        log(f"    {label}: {r['samples_per_s']:.3f} samples/s, MFU {r['mfu']}, peak "
            f"{r['peak_memory_bytes'] / GiB:.1f} GiB, warm-up {r['warmup_s']:.0f} s")
        return r

    def best_compiled(self) -> dict:
        """The faster of the compiled rows at the main batch (plain or channels_last_3d)."""
        sec = self.res["sections"]
        rows = [sec.get(k) or {} for k in ("compiled", "compiled_cl")]
        rows = [r for r in rows if r.get("samples_per_s")]
        return max(rows, key=lambda r: r["samples_per_s"]) if rows else {}

    def best_layout(self) -> bool:
        return bool((self.best_compiled().get("performance") or {}).get("channels_last"))

    def layout(self) -> dict:
        """Eager forward of the channels_last_3d UNet under bf16 autocast: which modules hand on NDHWC, which not."""
        cl = torch.channels_last_3d
        torch.manual_seed(0)
        net = build_model(self.cfg["model"]).to(self.device).to(memory_format=cl).eval()
        x = torch.rand(1, 1, *self.shape, device=self.device).contiguous(memory_format=cl)
        kept, lost, breakers = {}, {}, []

        def hook(name):
            def h(module, args, out):
                if not (isinstance(out, torch.Tensor) and out.dim() == 5):
                    return
                kind = type(module).__name__
                ok = out.is_contiguous(memory_format=cl)
                (kept if ok else lost)[kind] = (kept if ok else lost).get(kind, 0) + 1
                ins = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 5]
                if ins and all(a.is_contiguous(memory_format=cl) for a in ins) and not ok and len(breakers) < 30:
                    breakers.append(f"{name} ({kind})")
            return h

        handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()]
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                net(x, timesteps=torch.tensor([10], device=self.device))
        finally:
            for h in handles:
                h.remove()
        return {"outputs_ndhwc_by_module": kept, "outputs_ncdhw_by_module": lost,
                "modules_that_turn_ndhwc_into_ncdhw": breakers,
                "note": "eager; under torch.compile inductor chooses the layouts itself"}

    # ---- sampling ------------------------------------------------------------------------------------

    def sampling_r2(self) -> dict:
        """denoise() per DDPM step, eager vs compiled (sampling.sample.fast_model), at sample.batch and 2x;
        derived: DDPM-1000 for 86 volumes on one GPU."""
        from brainddpm.device import Performance
        from brainddpm.models.diffusion import build_scheduler
        from brainddpm.sampling.sample import denoise, fast_model

        torch.manual_seed(0)
        net = build_model(self.cfg["model"]).to(self.device).eval()
        sch = build_scheduler(self.cfg["scheduler"])
        sch.set_timesteps(sch.num_train_timesteps)
        all_t = sch.timesteps.clone()
        k = 2 if self.tiny else 8
        rows = {}
        for label, model in (("eager", net), ("compiled", fast_model(net, Performance(compile=True)))):
            for b in ([2] if self.tiny else [int(self.cfg["sample"]["batch"])]):
                if self.left() < 20:
                    rows[f"{label}_b{b}"] = {"skipped": "budget"}
                    continue
                try:
                    t = time.perf_counter()
                    sch.timesteps = all_t[:2]
                    denoise(model, sch, list(range(b)), self.shape, self.device)  # compile / autotune
                    synchronize(self.device)
                    first = time.perf_counter() - t
                    sch.timesteps = all_t[:k]
                    t = time.perf_counter()
                    denoise(model, sch, list(range(b)), self.shape, self.device)
                    synchronize(self.device)
                    per = (time.perf_counter() - t) / k
                    rows[f"{label}_b{b}"] = {"variant": label, "batch": b, "s_per_step": per,
                                             "first_two_steps_s": first, "volume_steps_per_s": b / per}
                    log(f"    sampling {label} batch {b}: {per:.4f} s/step ({b / per:.2f} volume-steps/s)")
                except Exception as exc:
                    rows[f"{label}_b{b}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    _cleanup(self.device)
        torch._dynamo.reset()
        ok = {key: r for key, r in rows.items() if "s_per_step" in r}
        if ok:
            key = max(ok, key=lambda kk: ok[kk]["volume_steps_per_s"])
            r = ok[key]
            batches = math.ceil(86 / r["batch"])
            rows["ddpm1000_86_volumes_one_gpu_derived_min"] = batches * 1000 * r["s_per_step"] / 60
            rows["derived_from"] = key
        return rows


def markdown(s: Round2) -> str:
    sec = s.res["sections"]
    env, ceil, fl = sec.get("env") or {}, sec.get("ceilings") or {}, sec.get("flops") or {}
    base = (sec.get("baseline") or {}).get("samples_per_s")
    lines = [f"# GPU round 2, {DATE}: {env.get('device')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, MONAI {env.get('monai')}, "
             f"DeepSpeed {env.get('deepspeed')}; shape {'x'.join(map(str, s.shape))}; `{s.res['command']}`", ""]
    if ceil.get("matmul_bf16_tflops"):
        lines += [f"bf16 matmul: {ceil['matmul_bf16_tflops']:.0f} TFLOP/s; copy "
                  f"{ceil.get('copy_tb_per_s_read_plus_write', 0):.2f} TB/s", ""]
    if fl.get("tflop_per_sample"):
        lines += [f"FLOPs per volume fwd+bwd: {fl['tflop_per_sample']:.2f} TFLOP", ""]
    lines += ["| row | variant | batch | samples/s | MFU (989) | vs tutorial | peak memory | warm-up s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in ("baseline", "eager", "eager_lpnorm", "compiled", "compiled_cl", "compiled_lpnorm", "b4_capped",
                "max_autotune"):
        r = sec.get(key)
        if not isinstance(r, dict):
            continue
        if "samples_per_s" not in r:
            lines.append(f"| {key} | {r.get('variant', '')} | {r.get('batch', '')} | "
                         f"{r.get('error') or r.get('skipped')} | | | | |")
            continue
        mfu = r.get("mfu")
        lines.append(f"| {key} | {r.get('variant')} | {r['batch']} | {r['samples_per_s']:.3f} | "
                     f"{'–' if mfu is None else f'{100 * mfu:.1f} %'} | "
                     f"{r['samples_per_s'] / base:.2f}x | {r['peak_memory_bytes'] / GiB:.1f} GiB | "
                     f"{r.get('warmup_s', 0):.0f} |" if base else
                     f"| {key} | {r.get('variant')} | {r['batch']} | {r['samples_per_s']:.3f} | | | | |")
    lay = sec.get("layout") or {}
    if lay.get("modules_that_turn_ndhwc_into_ncdhw") is not None:
        lines += ["", "Layout (eager, channels_last_3d): NDHWC outputs " + json.dumps(lay["outputs_ndhwc_by_module"])
                  + "; NCDHW outputs " + json.dumps(lay["outputs_ncdhw_by_module"]),
                  "turned back to NCDHW by: " + ", ".join(lay["modules_that_turn_ndhwc_into_ncdhw"][:12])]
    sm = sec.get("sampling") or {}
    if sm:
        lines += ["", "Sampling (denoise, bf16, per DDPM step): " + "; ".join(
            f"{k2} {v['s_per_step']:.4f} s/step" for k2, v in sm.items() if isinstance(v, dict) and "s_per_step" in v)]
        if "ddpm1000_86_volumes_one_gpu_derived_min" in sm:
            lines.append(f"DDPM-1000, 86 volumes, one GPU (derived from {sm['derived_from']}): "
                         f"{sm['ddpm1000_86_volumes_one_gpu_derived_min']:.1f} min")
    rows = [r for r in sec.values() if isinstance(r, dict) and r.get("kernel_categories_s_per_step")]
    if rows:
        best = max(rows, key=lambda r: r["samples_per_s"])
        step_s = best["batch"] / best["samples_per_s"]
        lines += ["", f"Kernel time of the fastest row ({best['variant']}, batch {best['batch']}): "
                  f"{best['kernel_s_per_step'] * 1e3:.0f} ms of kernels per step, {step_s * 1e3:.0f} ms per step"]
        lines += [f"- {c}: {v * 1e3:.1f} ms ({100 * v / best['kernel_s_per_step']:.1f} %)"
                  for c, v in sorted(best["kernel_categories_s_per_step"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--deadline", type=float, help="unix time after which no section starts")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--resume-json", type=Path, help="gpu_round2.json of an earlier call of this sitting")
    p.add_argument("--sections", nargs="*")
    args = p.parse_args(argv)
    s = Round2(args.out, args.budget_s, args.tiny, args.batch)
    s.deadline = args.deadline
    if args.resume_json and args.resume_json.exists():
        old = json.loads(args.resume_json.read_text())
        s.res["sections"].update(old.get("sections", {}))
        s.res["earlier_commands"] = [*old.get("earlier_commands", []), old.get("command")]
        s.flops = (s.res["sections"].get("flops") or {}).get("flops_per_sample")
    cap = None if s.tiny else A100_CAP
    plan = [  # name, function, seconds it needs (guard)
        ("env", s.env, 0), ("ceilings", s.ceilings, 5), ("flops", s.flop_count, 10),
        ("baseline", lambda: {**s.baseline(), "variant": "MONAI tutorial step (fp16, GradScaler)"}, 25),
        ("eager", lambda: s.engine("engine, eager (the old default)", {}), 25),
        ("eager_lpnorm", lambda: s.engine("engine, eager, bf16 GroupNorm", {"low_precision_norm": True}), 25),
        ("compiled", lambda: s.engine("engine, compiled", {"compile": True}), 130),
        ("compiled_cl", lambda: s.engine("engine, compiled, channels_last_3d",
                                         {"compile": True, "channels_last": True}), 130),
        ("b4_capped", lambda: s.engine("engine, compiled, batch 2x, 64 GB cap",
                                       {"compile": True, "channels_last": s.best_layout()},
                                       batch=2 * s.batch, cap=cap, steps=None if s.tiny else 10), 130),
        ("layout", s.layout, 10),
        ("sampling", s.sampling_r2, 150),
        ("compiled_lpnorm", lambda: s.engine("engine, compiled, bf16 GroupNorm",
                                             {"compile": True, "channels_last": s.best_layout(),
                                              "low_precision_norm": True}), 130),
        ("max_autotune", lambda: s.engine("engine, compiled max-autotune-no-cudagraphs",
                                          {"compile": True, "channels_last": s.best_layout(),
                                           "compile_mode": "max-autotune-no-cudagraphs"}), 240),
    ]
    table = {name: (fn, need) for name, fn, need in plan}
    for name in args.sections or [n for n, _, _ in plan]:
        fn, need = table[name]
        done = s.res["sections"].get(name)
        if isinstance(done, dict) and done and not ({"skipped", "error"} & set(done)):
            log(f"KEEP {name}: measured in an earlier call of this sitting")
            continue
        s.run(name, fn, 0 if args.tiny else need)
    md = markdown(s)
    (args.out / "gpu_round2.md").write_text(md)
    print(md, flush=True)
    log("done")
    return 0


gpu_session.DATE = DATE

if __name__ == "__main__":
    raise SystemExit(main())
