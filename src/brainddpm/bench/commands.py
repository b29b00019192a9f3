"""The `bench` subcommand and its benchmarks (data, train, eval, sampling, gpu); `bench.suite.main` runs them."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_bench(args) -> None:
    from brainddpm.bench import suite as bench

    bench.main(args)


def _add_data(bsub) -> None:
    b = bsub.add_parser("data", help="NIfTI load+preprocess vs shard reads (volumes/s)",
                        description="Write stand-in NIfTI volumes, then time loading and preprocessing them "
                                    "against reading the same volumes from an HDF5 shard (volumes/s).")
    b.add_argument("--n", type=int, default=16, help="volumes to measure (default: 16)")
    b.add_argument("--target-shape", type=int, nargs=3, default=[84, 128, 84],
                   help="shape the volumes are resized to, D H W (default: 84 128 84)")
    b.add_argument("--workdir", type=Path, default=Path("results/bench"), help="scratch folder")
    b.add_argument("--compare-codecs", action="store_true", help="also measure size and read speed per codec")


def _add_train(bsub) -> None:
    """`bench train` (bench/train.py, run by suite.bench_train_main): its options go here."""
    b = bsub.add_parser("train", help="training steps/s, samples/s, MFU, peak memory on this device",
                        description="Time training steps of a preset's UNet through the training engine on this "
                                    "device: steps/s, samples/s, MFU and peak memory, beside the MONAI "
                                    "tutorial's step on a GPU.")
    b.add_argument("--preset", choices=["paper", "demo"], default="paper", help="model preset (default: paper)")
    b.add_argument("--batch", type=int, default=1, help="micro-batch (default: 1)")
    b.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps (default: 10)")
    b.add_argument("--target-shape", type=int, nargs=3, help="override the preset's target shape")
    b.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present")
    b.add_argument("--backend", choices=["deepspeed", "accelerate", "ddp"],
                   help="training engine to time (default: the preset's train.backend)")
    b.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the preset's train.precision")
    b.add_argument("--compile", choices=["auto", "true", "false"],
                   help="performance.compile (default: the preset's, auto: on for CUDA); warm-up steps include "
                        "compiling")
    b.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"],
                   help="performance.compile_mode (default: the preset's)")
    b.add_argument("--channels-last", choices=["auto", "true", "false"],
                   help="performance.channels_last (default: the preset's)")
    b.add_argument("--low-precision-norm", choices=["auto", "true", "false"],
                   help="performance.low_precision_norm: GroupNorm in bf16 (default: the preset's)")
    b.add_argument("--memory-cap-gib", type=float,
                   help="allow this process at most this much GPU memory, e.g. 59.6 for a 64 GB A100")
    b.add_argument("--baseline", choices=["tutorial", "none"], default="tutorial",
                   help="on a GPU, also time the MONAI 3D DDPM tutorial's step (fp16, GradScaler) on the same "
                        "model, shape and batch (default: tutorial)")
    b.add_argument("--json", type=Path, metavar="PATH",
                   help="also write the figures (device, versions, samples/s, MFU, peak memory, for the loop "
                        "and the baseline) as JSON")


def _add_eval(bsub) -> None:
    b = bsub.add_parser("eval", help="one point evaluation of all metrics vs the bootstrap resamples",
                        description="Time one evaluation of every metric on random stand-in volumes against "
                                    "its bootstrap resamples, split into chunks as the workflow's jobs are.")
    b.add_argument("--n", type=int, default=86,
                   help="volumes per side, real and synthetic (random stand-ins; default: 86)")
    b.add_argument("--shape", type=int, nargs=3, default=[84, 128, 84],
                   help="volume shape, D H W (default: 84 128 84)")
    b.add_argument("--kernel", type=int, default=5, help="MS-SSIM kernel size (default: 5)")
    b.add_argument("--scales", type=int, default=5, help="MS-SSIM scales (default: 5)")
    b.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    b.add_argument("--jobs", type=int, default=4, help="chunks the resamples are split into, as evaluate.jobs "
                   "(default: 4)")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def _add_sampling(bsub) -> None:
    b = bsub.add_parser("sampling", help="DDPM (all steps) vs DDIM wall time on one trained model",
                        description="Sample a few volumes from one trained model with DDPM (every training "
                                    "step) and with DDIM, and print the wall time of each.")
    b.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors")
    b.add_argument("--n", type=int, default=4, help="volumes per sampler (default: 4)")
    b.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (default: 50)")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


GPU_DESCRIPTION = """Measure this node for the configured model, with the training engine and the sampler:
the training step (samples/s, MFU, peak memory) of the pixel UNet, or of the autoencoder and the latent UNet
for a latent config (model.kind: latent); the MONAI tutorial's step beside the pixel UNet's; seconds per
synthetic volume (DDIM, the decode included for a latent model); decode time per volume, whole and by
windows. Prints a table and writes every figure as JSON (--out), after each section.

Each section runs in a child process under its own deadline (--section-timeout-s) and within the whole
budget (--budget-s): one that overruns is recorded as timed out and the next one runs; one that fails or
runs out of memory records the error. Random inputs and weights (times do not depend on them).

examples:
  brainddpm bench gpu --out results/bench/gpu.json                          # the reference pixel model
  brainddpm bench gpu --config config/latent.yaml --memory-cap-gib 59.6     # 1 mm latent, a 64 GB A100's cap
  brainddpm bench gpu --config my.yaml --out results/bench/my.json --resume # rerun what did not finish
  brainddpm bench gpu --tiny --out /tmp/tiny.json                           # every code path, on a CPU
"""


def _add_gpu(bsub) -> None:
    from brainddpm.arguments import performance_args

    b = bsub.add_parser("gpu", help="this node for the configured model: training step, sampling, decoding (table "
                        "and JSON)", description=GPU_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                   help="config files merged in order over this checkout's config/config.yaml (e.g. "
                        "config/latent.yaml; default: config/config.yaml alone, the reference pixel model)")
    b.add_argument("--out", type=Path, default=Path("results/bench/gpu.json"),
                   help="JSON record, rewritten after every section (default: results/bench/gpu.json)")
    b.add_argument("--tiny", action="store_true",
                   help="small networks and shapes, 2 timed training steps, 3 DDIM steps, on the CPU: every "
                        "section's code path in about a minute")
    b.add_argument("--sections", nargs="+", metavar="NAME",
                   help="only these, in the table's order (pixel: environment ceilings train tutorial sampling; "
                        "latent: environment ceilings autoencoder train decode sampling)")
    b.add_argument("--steps", type=int, default=15, help="timed training steps after 3 warm-up steps (default: 15)")
    b.add_argument("--ddim-steps", type=int, help="DDIM steps of the sampling section (default: 50; 3 with --tiny)")
    b.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda if present")
    b.add_argument("--memory-cap-gib", type=float,
                   help="allow the training, decode and sampling sections at most this much GPU memory, e.g. "
                        "59.6 for a 64 GB A100")
    b.add_argument("--budget-s", type=float,
                   help="the whole command's seconds: a section that no longer fits (by its estimated need on an "
                        "H200) is skipped, the one running at the end is stopped (default: no budget)")
    b.add_argument("--section-timeout-s", type=float, default=600.0,
                   help="the most seconds one section may run, compiling included (default: 600)")
    b.add_argument("--resume", action="store_true",
                   help="keep the measured sections of an existing --out and run the others again (skipped, "
                        "failed, timed out)")
    performance_args(b)


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print their figures (data, train, eval, sampling, gpu)",
                       description="Measure throughput; figures are printed and can go in docs/benchmarks.md.")
    bsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_data(bsub)
    _add_train(bsub)
    _add_eval(bsub)
    _add_sampling(bsub)
    _add_gpu(bsub)
    p.set_defaults(func=cmd_bench)
