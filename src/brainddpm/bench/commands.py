"""The `bench` subcommand and its benchmarks (data, train, eval, sampling); `bench.suite.main` runs them."""

from __future__ import annotations

from pathlib import Path


def cmd_bench(args) -> None:
    from brainddpm.bench import suite as bench

    bench.main(args)


def _add_data(bsub) -> None:
    b = bsub.add_parser("data", help="NIfTI load+preprocess vs shard reads (volumes/s)")
    b.add_argument("--n", type=int, default=16, help="volumes to measure (default: 16)")
    b.add_argument("--target-shape", type=int, nargs=3, default=[84, 128, 84],
                   help="shape the volumes are resized to, D H W (default: 84 128 84)")
    b.add_argument("--workdir", type=Path, default=Path("results/bench"), help="scratch folder")
    b.add_argument("--compare-codecs", action="store_true", help="also measure size and read speed per codec")


def _add_train(bsub) -> None:
    """`bench train` (bench/train.py, run by suite.bench_train_main): its options go here."""
    b = bsub.add_parser("train", help="training steps/s, samples/s, MFU, peak memory on this device")
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
    b = bsub.add_parser("eval", help="one point evaluation of all metrics vs the bootstrap resamples")
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
    b = bsub.add_parser("sampling", help="DDPM (all steps) vs DDIM wall time on one trained model")
    b.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors")
    b.add_argument("--n", type=int, default=4, help="volumes per sampler (default: 4)")
    b.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (default: 50)")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print their figures (data, train, eval, sampling)",
                       description="Measure throughput; figures are printed and can go in docs/benchmarks.md.")
    bsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_data(bsub)
    _add_train(bsub)
    _add_eval(bsub)
    _add_sampling(bsub)
    p.set_defaults(func=cmd_bench)
