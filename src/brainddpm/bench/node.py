"""`brainddpm bench gpu`: measure this node with the training engine and the sampler, for the configured model.

Sections, each a row of the table and of the JSON (`--out`):
  environment  device, memory, library versions;
  ceilings     bf16 matrix product and device copy (what the MFU is set against);
  train        the training step through the training loop's own `Engine` (bench/train.py `bench_train`: the
               configured backend, precision and `performance` section, EMA): samples/s, MFU, peak memory;
               the pixel UNet on volumes, or for a latent config (`model.kind: latent`) the latent UNet on
               the autoencoder's latents;
  tutorial     pixel configs: the MONAI 3D DDPM tutorial's step on the same UNet, shape and batch (the
               baseline the training step is compared with);
  autoencoder  latent configs: AutoencoderKL training with its own objective and discriminator;
  decode       latent configs: seconds per volume to decode a latent as the sampling stage does (one volume
               at a time, fp32), whole and by sliding windows;
  sampling     seconds per synthetic volume of the sampler as the sampling stage runs it (`sample.batch`
               volumes per batch, compiled on a GPU by default): DDIM with `--ddim-steps`, plus the decode for
               a latent model.
Random inputs and random weights: times do not depend on them. Every section runs in a child process
(bench/harness.py) under its own deadline; one that overruns is recorded as timed out, and the next runs.
Run it as a module (`python -m brainddpm.bench.node`) only as that child.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# CPU-sized stand-ins (`--tiny`): every code path of every section, in seconds on 2 cores
TINY_PIXEL = {
    "data": {"target_shape": [8, 12, 8]},
    "model": {"channels": [8, 8, 16], "attention_levels": [False, False, True], "num_res_blocks": 1,
              "num_head_channels": 16, "norm_num_groups": 8},
    "train": {"micro_batch": 2, "num_workers": 0},
    "sample": {"batch": 2},
}
TINY_LATENT = {
    "data": {"target_shape": [24, 32, 24]},  # padded to 32x32x32, latents of 8x8x8
    "model": {"channels": [8, 8, 16], "attention_levels": [False, True, True], "num_res_blocks": 1,
              "num_head_channels": 8, "norm_num_groups": 8},
    "autoencoder": {"channels": [4, 8, 8], "attention_levels": [False, False, False], "num_res_blocks": 1,
                    "norm_num_groups": 4, "pad_multiple": 16, "adversarial": {"channels": 4, "layers": 2}},
    "train": {"micro_batch": 2, "num_workers": 0},
    "sample": {"batch": 2},
}
TINY_DDIM_STEPS = 3
# section: seconds it needs on one H200 at the presets (the budget guard; docs/benchmarks.md, GPU rounds 2-3)
NEEDS_S = {"environment": 10, "ceilings": 5, "train": 100, "tutorial": 25, "autoencoder": 150, "decode": 30,
           "sampling": 90}
PIXEL_SECTIONS = ("environment", "ceilings", "train", "tutorial", "sampling")
LATENT_SECTIONS = ("environment", "ceilings", "autoencoder", "train", "decode", "sampling")
GiB = 2**30


def sections_for(cfg: dict) -> tuple[str, ...]:
    from brainddpm.config import is_latent

    return LATENT_SECTIONS if is_latent(cfg) else PIXEL_SECTIONS


class Node:
    """What every section needs, built in the child from the plan the command wrote: the config, the device,
    the shapes, the step counts."""

    def __init__(self, plan: dict) -> None:
        import torch

        from brainddpm.config import is_latent
        from brainddpm.models.autoencoder import latent_shape

        self.plan, self.cfg = plan, plan["config"]
        cuda = plan["device"] == "cuda" or (plan["device"] == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.cuda = cuda
        self.cfg["launch"]["gpus_per_node"] = 1 if cuda else 0  # one process on one device
        self.image_shape = tuple(self.cfg["data"]["target_shape"])
        self.latent = is_latent(self.cfg)
        self.latent_shape = latent_shape(self.cfg["autoencoder"], self.image_shape) if self.latent else None
        self.cap = plan.get("memory_cap_bytes")
        self.steps, self.warmup = int(plan["steps"]), int(plan["warmup"])
        self.flops: int | None = None  # the pixel UNet's FLOPs per sample, counted by `train`, read by `tutorial`

    def table(self) -> dict:
        """sections_for(cfg) -> (function, seconds it needs; 0 with --tiny), for harness.run_child."""
        from brainddpm.bench import measure

        functions = {"environment": measure.environment_row, "ceilings": measure.ceilings_row,
                     "train": measure.train_row, "tutorial": measure.tutorial_row,
                     "autoencoder": measure.autoencoder_row, "decode": measure.decode_row,
                     "sampling": measure.sampling_row}
        need = (lambda name: 0.0) if self.plan["tiny"] else NEEDS_S.get
        return {name: ((lambda f=functions[name]: f(self)), need(name)) for name in sections_for(self.cfg)}


# the config sections the measurements read; the rest (datasets, results ...) is not this command's concern
SECTIONS_READ = ("data", "model", "scheduler", "train", "launch", "autoencoder", "decode", "sample", "performance")


def node_config(paths: list[Path] | None, tiny: bool, performance_json: str | None) -> dict:
    """config/config.yaml of this checkout with `paths` merged over it in order (as `snakemake --configfile
    config/config.yaml PATH...` does), then `--tiny`'s shapes, then `--performance-json` (or
    $BRAINDDPM_PERFORMANCE); the sections it measures (SECTIONS_READ), validated."""
    from brainddpm.arguments import with_performance
    from brainddpm.bench.suite import checkout_config_dir
    from brainddpm.config import deep_merge, is_latent, read_config_file, validate_config

    cfg: dict = {}
    for path in [checkout_config_dir() / "config.yaml", *(paths or [])]:
        cfg = deep_merge(cfg, read_config_file(path))
    if tiny:
        cfg = deep_merge(cfg, TINY_LATENT if is_latent(cfg) else TINY_PIXEL)
    cfg = validate_config({k: cfg[k] for k in SECTIONS_READ if k in cfg}, partial=True)
    return with_performance(cfg, argparse.Namespace(performance_json=performance_json))


def worker_main(argv: list[str]) -> int:
    """The child process of `brainddpm bench gpu` (harness.run_sections starts it)."""
    from brainddpm.bench.harness import run_child

    p = argparse.ArgumentParser(prog="python -m brainddpm.bench.node", description="one child of bench gpu")
    p.add_argument("plan", type=Path)
    p.add_argument("--progress", type=Path, required=True)
    p.add_argument("--budget-end", type=float)
    p.add_argument("--sections", nargs="+", required=True)
    args = p.parse_args(argv)
    node = Node(json.loads(args.plan.read_text()))
    run_child(args.sections, node.table(), args.progress, args.budget_end)
    return 0


def _keep(row) -> bool:
    """A row measured in an earlier run of the same --out: kept by --resume."""
    return isinstance(row, dict) and bool(row) and not ({"skipped", "error", "timed_out", "crashed"} & set(row))


def _record(args, cfg: dict, names: tuple[str, ...]) -> dict:
    """The JSON record: an earlier one of --out with --resume (its measured rows kept), else a new one."""
    import shlex

    from brainddpm.config import is_latent

    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    options["config"] = [str(p) for p in args.config or []]
    record = {"command": shlex.join(sys.argv), "options": options, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "tiny": args.tiny, "kind": "latent" if is_latent(cfg) else "pixel",
              "image_shape": cfg["data"]["target_shape"],
              "sections": {}}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        record["sections"] = {k: v for k, v in old.get("sections", {}).items() if _keep(v) and k in names}
        record["earlier_commands"] = [*old.get("earlier_commands", []), old.get("command")]
    return record


def _write(path: Path, record: dict) -> None:
    from brainddpm.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str))


def main(args) -> None:
    """`brainddpm bench gpu`: the sections in child processes, the JSON written after every row, the table."""
    import tempfile

    from brainddpm.bench.harness import run_sections
    from brainddpm.bench.table import table
    from brainddpm.config import is_latent
    from brainddpm.errors import ConfigError

    cfg = node_config(args.config, args.tiny, args.performance_json)
    names = sections_for(cfg)
    unknown = sorted(set(args.sections or ()) - set(names))
    if unknown:
        kind = "latent" if is_latent(cfg) else "pixel"
        raise ConfigError(f"--sections: {', '.join(unknown)} not measured for a {kind} config; its sections are "
                          f"{', '.join(names)}")
    record = _record(args, cfg, names)
    wanted = [n for n in names if n in (args.sections or names) and n not in record["sections"]]
    plan = {"config": cfg, "device": "cpu" if args.tiny else args.device, "tiny": args.tiny,
            "steps": 2 if args.tiny else args.steps, "warmup": 1 if args.tiny else 3,
            "ddim_steps": args.ddim_steps or (TINY_DDIM_STEPS if args.tiny else 50),
            "memory_cap_bytes": int(args.memory_cap_gib * GiB) if args.memory_cap_gib else None}
    record["plan"] = {k: v for k, v in plan.items() if k != "config"}

    def on_row(name: str, row: dict) -> None:
        record["sections"][name] = row
        _write(args.out, record)
        print(f"brainddpm bench gpu: {name}: {_short(row)}", file=sys.stderr, flush=True)

    _write(args.out, record)
    budget_end = time.time() + args.budget_s if args.budget_s else None
    with tempfile.TemporaryDirectory(prefix="brainddpm-bench-gpu-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan, default=str))
        run_sections([sys.executable, "-m", "brainddpm.bench.node", str(plan_path)], wanted, Path(tmp) / "progress",
                     budget_end, args.section_timeout_s, on_row, needs={} if args.tiny else NEEDS_S)
    record["sections"] = {n: record["sections"][n] for n in names if n in record["sections"]}
    _write(args.out, record)
    print(table(record))
    print(f"written: {args.out}")


def _short(row: dict) -> str:
    for key in ("error", "skipped"):
        if key in row:
            return f"{key}: {row[key]}"
    return "measured"


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
