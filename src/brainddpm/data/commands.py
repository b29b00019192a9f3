"""The data stage's subcommands: demo-cohort, raw-heads, preprocess, manifest, split, shard, index (one per rule
of prepare.smk)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from brainddpm.arguments import config_args, load_args_config, log


def cmd_demo_cohort(args) -> None:
    from brainddpm.data.demo import write_cohort

    paths = write_cohort(args.n, args.seed, args.out, mosaic=args.mosaic, progress=sys.stderr.isatty(),
                         ventricle_growth_mm=args.ventricle_growth_mm, patient_fraction=args.patient_fraction)
    log.info("wrote %d synthetic volumes and participants.tsv to %s", len(paths), args.out)


def cmd_raw_heads(args) -> None:
    from brainddpm.data.rawhead import write_raw_heads

    paths = write_raw_heads(args.source, args.n, args.seed, args.out)
    log.info("wrote %d synthetic raw heads (BIDS) and their truth to %s", len(paths), args.out)


def cmd_preprocess(args) -> None:
    from brainddpm.data.preprocess import run_preprocess
    from brainddpm.fileio import atomic_path

    cfg = load_args_config(args)
    record = run_preprocess(cfg.get("preprocess", {}), cfg["data"]["grid"], args.input, args.brain, args.mask,
                            args.transform, args.qc_png, args.cache)
    if args.record is not None:
        with atomic_path(args.record) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
    log.info("preprocessed %s: brain %.0f ml, template Dice %.3f, steps found in the cache: %s", args.input,
             record["brain_volume_ml"], record["template_dice"], ", ".join(record["cache_hits"]) or "none")


def cmd_manifest(args) -> None:
    from brainddpm.data.prepare import run_manifest

    run_manifest(load_args_config(args), args.manifest, args.excluded, jobs=args.jobs, preprocessed=args.preprocessed)


def cmd_qc(args) -> None:
    from brainddpm.data.qc import run_qc

    run_qc(load_args_config(args), args.manifest, args.excluded, args.out, args.summary, args.mosaic, jobs=args.jobs)


def cmd_split(args) -> None:
    from brainddpm.data.prepare import run_split

    run_split(load_args_config(args), args.manifest, args.out, qc_path=args.qc)


def cmd_shard(args) -> None:
    from brainddpm.data.prepare import run_shard

    run_shard(load_args_config(args), args.splits, args.split, args.index, args.out)


def cmd_index(args) -> None:
    from brainddpm.data.prepare import run_index

    run_index(args.split, args.shards, args.out)


def add_commands(sub) -> None:
    _add_input_commands(sub)
    _add_manifest_commands(sub)
    _add_shard_commands(sub)


def _add_input_commands(sub) -> None:
    """Where images come from: the demo cohort, raw-like heads, and preprocessing of raw heads."""
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

    p = sub.add_parser("raw-heads", help="write synthetic raw native-space T1 heads (BIDS) with their truth",
                       description="Build raw-like T1 heads from skull-stripped MNI-space brains (the demo cohort's "
                                   "volumes, or the MNI152 template): scalp and skull around the brain, a random "
                                   "rotation and shift into a native space, anisotropic voxels, a bias field and "
                                   "noise. Writes OUT/sub-*/ses-*/anat/*_T1w.nii.gz, the rows of participants.tsv, "
                                   "and the truth (MNI brain mask, transform) below OUT/derivatives/truth. "
                                   "Deterministic for a seed.")
    p.add_argument("--from", dest="source", type=Path,
                   help="folder of skull-stripped MNI-space NIfTI brains, e.g. the demo cohort (default: the "
                        "MNI152 2009a template shipped with nilearn)")
    p.add_argument("--n", type=int, default=4, help="number of heads (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output BIDS folder")
    p.set_defaults(func=cmd_raw_heads)

    p = sub.add_parser("preprocess", help="raw native T1 head -> skull-stripped brain on the MNI grid",
                       description="Bring one raw native-space T1 head into MNI space as a skull-stripped brain: "
                                   "optional non-local-means denoising (dipy), N4 bias correction (ANTs), brain "
                                   "extraction (deepbet), affine registration of the brain to the MNI152 2009a "
                                   "template brain (ANTs), resampling onto data.grid, a second N4 inside the mask. "
                                   "Writes the brain, its mask, the forward transform (.mat) and a QC PNG; with "
                                   "--cache, every step is cached and a rerun with nothing changed redoes nothing.")
    config_args(p)
    p.add_argument("--input", type=Path, required=True, help="raw T1-weighted head (NIfTI, native space)")
    p.add_argument("--brain", type=Path, required=True, help="output skull-stripped brain on the grid (.nii.gz)")
    p.add_argument("--mask", type=Path, required=True, help="output brain mask on the grid (.nii.gz)")
    p.add_argument("--transform", type=Path, required=True,
                   help="output ANTs forward transform (.mat; MNI to native, for ants.apply_transforms)")
    p.add_argument("--qc-png", type=Path, required=True, help="output QC picture (three slices, template outline)")
    p.add_argument("--cache", type=Path, help="folder of the steps' cached results (default: none, redo all)")
    p.add_argument("--record", type=Path, help="also write the run's record (seconds per step, brain volume, "
                                               "template Dice, cache hits, tool versions) as JSON")
    p.set_defaults(func=cmd_preprocess)


def _add_manifest_commands(sub) -> None:
    """Which images enter: the manifest, and input QC."""
    p = sub.add_parser("manifest", help="find and check input images; write manifest.tsv and excluded.tsv",
                       description="List every image of the configured datasets with its header facts and "
                                   "sha256; images that cannot be used are listed with the reason.")
    config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="output manifest.tsv")
    p.add_argument("--excluded", type=Path, required=True, help="output excluded.tsv")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default: 1)")
    p.add_argument("--preprocessed", type=Path,
                   help="the preprocess rule's folder: datasets with preprocess: true are read from there")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("qc", help="input QC of every manifest image; write qc.tsv, data_summary.json, a mosaic",
                       description="Bring each image onto the grid and compare it with the MNI152 2009 template "
                                   "brain: Dice, brain on the field of view's border, skull or scalp left, robust "
                                   "z-scores of brain volume and intensity within its dataset. data.qc.policy: "
                                   "warn (flag), exclude (left out before the split) or fail (stop, naming them). "
                                   "Also counts what the data stage left out, per dataset and reason.")
    config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="manifest.tsv of `manifest`")
    p.add_argument("--excluded", type=Path, required=True, help="excluded.tsv of `manifest`")
    p.add_argument("--out", type=Path, required=True, help="output qc.tsv (one row per image)")
    p.add_argument("--summary", type=Path, required=True, help="output data_summary.json (in and out, per dataset)")
    p.add_argument("--mosaic", type=Path, required=True, help="output PNG of the worst-scoring images")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default: 1)")
    p.set_defaults(func=cmd_qc)


def _add_shard_commands(sub) -> None:
    """The split, the shards and their index."""
    p = sub.add_parser("split", help="subject-level train/val split; write splits.tsv",
                       description="Assign whole subjects to train or val (stratified by dataset, seeded).")
    config_args(p)
    p.add_argument("--manifest", type=Path, required=True, help="manifest.tsv of `manifest`")
    p.add_argument("--out", type=Path, required=True, help="output splits.tsv")
    p.add_argument("--qc", type=Path, help="qc.tsv of `qc` (data.qc.policy: exclude): leave out what it excludes")
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

    p = sub.add_parser("index", help="write index.json for the shards of one split",
                       description="Summarise the shards of one split (image or latent shards) in index.json: "
                                   "each shard's sha256, volume checksums and subjects, and the images left out "
                                   "while sharding; the later stages read the split through it.")
    p.add_argument("--split", choices=["train", "val"], required=True, help="which split the shards belong to")
    p.add_argument("--shards", type=Path, nargs="*", default=[], help="shard files of the split")
    p.add_argument("--out", type=Path, required=True, help="output index.json")
    p.set_defaults(func=cmd_index)
