"""The data stage's subcommands: demo-cohort, manifest, split, shard, index (one per rule of prepare.smk)."""

from __future__ import annotations

import sys
from pathlib import Path

from brainddpm.commandline import config_args, load_args_config, log


def cmd_demo_cohort(args) -> None:
    from brainddpm.data.demo import write_cohort

    paths = write_cohort(args.n, args.seed, args.out, mosaic=args.mosaic, progress=sys.stderr.isatty(),
                         ventricle_growth_mm=args.ventricle_growth_mm, patient_fraction=args.patient_fraction)
    log.info("wrote %d synthetic volumes and participants.tsv to %s", len(paths), args.out)


def cmd_manifest(args) -> None:
    from brainddpm.data.prepare import run_manifest

    run_manifest(load_args_config(args), args.manifest, args.excluded, jobs=args.jobs)


def cmd_split(args) -> None:
    from brainddpm.data.prepare import run_split

    run_split(load_args_config(args), args.manifest, args.out)


def cmd_shard(args) -> None:
    from brainddpm.data.prepare import run_shard

    run_shard(load_args_config(args), args.splits, args.split, args.index, args.out)


def cmd_index(args) -> None:
    from brainddpm.data.prepare import run_index

    run_index(args.split, args.shards, args.out)


def add_commands(sub) -> None:
    p = sub.add_parser("demo-cohort", help="write the synthetic demo cohort (NIfTI + participants.tsv)",
                       description="Write N synthetic skull-stripped T1 volumes on the MNI 1 mm grid, derived "
                                   "from the MNI152 2009 template shipped with nilearn. Deterministic for a seed.")
    p.add_argument("--n", type=int, default=24, help="number of volumes (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mosaic", type=Path, help="also write a PNG mosaic of the first subjects")
    p.add_argument("--ventricle-growth-mm", type=float, default=0.0,
                   help="lateral ventricles grow by this many mm from age 20 to 85 (default: 0, no such effect)")
    p.add_argument("--patient-fraction", type=float, default=0.0,
                   help="add a diagnosis column: this fraction of the subjects (e.g. 0.2) are patients with "
                        "frontotemporal atrophy and wider ventricles (default: 0, no diagnosis column)")
    p.set_defaults(func=cmd_demo_cohort)

    p = sub.add_parser("manifest", help="find and check input images; write manifest.tsv and excluded.tsv",
                       description="List every image of the configured datasets with its header facts and "
                                   "sha256; images that cannot be used are listed with the reason.")
    config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="output manifest.tsv")
    p.add_argument("--excluded", type=Path, required=True, help="output excluded.tsv")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default: 1)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("split", help="subject-level train/val split; write splits.tsv",
                       description="Assign whole subjects to train or val (stratified by dataset, seeded).")
    config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="manifest.tsv of `manifest`")
    p.add_argument("--out", type=Path, required=True, help="output splits.tsv")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("shard", help="preprocess the images of one shard and write it as HDF5",
                       description="Preprocess (RAS, MNI grid, intensity normalisation, resize) the images of "
                                   "shard INDEX of SPLIT and write them to one HDF5 file.")
    config_args(p)
    p.add_argument("--splits", type=Path, required=True, help="splits.tsv")
    p.add_argument("--split", choices=["train", "val"], required=True, help="which split the shard belongs to")
    p.add_argument("--index", type=int, required=True, help="shard number within the split")
    p.add_argument("--out", type=Path, required=True, help="output shard-XXXX.h5")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("index", help="write index.json for the shards of one split")
    p.add_argument("--split", choices=["train", "val"], required=True, help="which split the shards belong to")
    p.add_argument("--shards", type=Path, nargs="*", default=[], help="shard files of the split")
    p.add_argument("--out", type=Path, required=True, help="output index.json")
    p.set_defaults(func=cmd_index)
