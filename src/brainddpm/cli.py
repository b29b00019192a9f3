"""The `brainddpm` command: one subcommand per pipeline step.

Each subcommand parses its arguments and calls one library function; the Snakemake rules in
workflow/rules/ call these subcommands. Configuration comes either from YAML files
(`--config config/config.yaml config/demo.yaml`, merged in order and validated) or, from the
workflow, as the already-validated JSON of the sections a step needs (`--config-json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import BrainDDPMError

log = logging.getLogger("brainddpm")


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                   help="config files merged in order (e.g. config/config.yaml config/demo.yaml)")
    g.add_argument("--config-json", metavar="JSON", help="validated config sections as JSON (used by the workflow)")


def _config(args) -> dict:
    from .config import load_config

    return json.loads(args.config_json) if args.config_json else load_config(args.config)


def cmd_demo_cohort(args) -> None:
    from .demo import write_cohort

    paths = write_cohort(args.n, args.seed, args.out, mosaic=args.mosaic, progress=sys.stderr.isatty())
    log.info("wrote %d synthetic volumes and participants.tsv to %s", len(paths), args.out)


def cmd_manifest(args) -> None:
    from .prepare import run_manifest

    run_manifest(_config(args), args.manifest, args.excluded, jobs=args.jobs)


def cmd_split(args) -> None:
    from .prepare import run_split

    run_split(_config(args), args.manifest, args.out)


def cmd_shard(args) -> None:
    from .prepare import run_shard

    run_shard(_config(args), args.splits, args.split, args.index, args.out)


def cmd_index(args) -> None:
    from .prepare import run_index

    run_index(args.split, args.shards, args.out)


def cmd_bench(args) -> None:
    from . import bench

    bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainddpm",
        description="Train, sample and evaluate a 3D DDPM of T1-weighted brain MRI. Normally run through "
                    "Snakemake (`snakemake --profile profiles/local`); each subcommand is one pipeline step.",
    )
    parser.add_argument("--version", action="version", version=f"brainddpm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-cohort", help="write the synthetic demo cohort (NIfTI + participants.tsv)",
                       description="Write N synthetic skull-stripped T1 volumes on the MNI 1 mm grid, derived "
                                   "from the MNI152 2009 template shipped with nilearn. Deterministic for a seed.")
    p.add_argument("--n", type=int, default=24, help="number of volumes (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mosaic", type=Path, help="also write a PNG mosaic of the first subjects")
    p.set_defaults(func=cmd_demo_cohort)

    p = sub.add_parser("manifest", help="find and check input images; write manifest.tsv and excluded.tsv",
                       description="List every image of the configured datasets with its header facts and "
                                   "sha256; images that cannot be used are listed with the reason.")
    _config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="output manifest.tsv")
    p.add_argument("--excluded", type=Path, required=True, help="output excluded.tsv")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default: 1)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("split", help="subject-level train/val split; write splits.tsv",
                       description="Assign whole subjects to train or val (stratified by dataset, seeded).")
    _config_args(p)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output splits.tsv")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("shard", help="preprocess the images of one shard and write it as HDF5",
                       description="Preprocess (RAS, MNI grid, intensity normalisation, resize) the images of "
                                   "shard INDEX of SPLIT and write them to one HDF5 file.")
    _config_args(p)
    p.add_argument("--splits", type=Path, required=True, help="splits.tsv")
    p.add_argument("--split", choices=["train", "val"], required=True)
    p.add_argument("--index", type=int, required=True, help="shard number within the split")
    p.add_argument("--out", type=Path, required=True, help="output shard-XXXX.h5")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("index", help="write index.json for the shards of one split")
    p.add_argument("--split", choices=["train", "val"], required=True)
    p.add_argument("--shards", type=Path, nargs="*", default=[], help="shard files of the split")
    p.add_argument("--out", type=Path, required=True, help="output index.json")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("bench", help="benchmarks that print their figures (data)",
                       description="Measure throughput; figures are printed and can go in docs/benchmarks.md.")
    bsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    b = bsub.add_parser("data", help="NIfTI load+preprocess vs shard reads (volumes/s)")
    b.add_argument("--n", type=int, default=16, help="volumes to measure (default: 16)")
    b.add_argument("--target-shape", type=int, nargs=3, default=[84, 128, 84])
    b.add_argument("--workdir", type=Path, default=Path("results/bench"), help="scratch folder")
    b.add_argument("--compare-codecs", action="store_true", help="also measure size and read speed per codec")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except BrainDDPMError as exc:
        print(f"brainddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
