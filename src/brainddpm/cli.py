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

from brainddpm import __version__
from brainddpm.errors import BrainDDPMError

log = logging.getLogger("brainddpm")


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                   help="config files merged in order (e.g. config/config.yaml config/demo.yaml)")
    g.add_argument("--config-json", metavar="JSON", help="validated config sections as JSON (used by the workflow)")


def _config(args) -> dict:
    from brainddpm.config import load_config, validate_config

    if args.config_json:
        return validate_config(json.loads(args.config_json), partial=True)
    return load_config(args.config)


def cmd_demo_cohort(args) -> None:
    from brainddpm.data.demo import write_cohort

    paths = write_cohort(args.n, args.seed, args.out, mosaic=args.mosaic, progress=sys.stderr.isatty(),
                         ventricle_growth_mm=args.ventricle_growth_mm)
    log.info("wrote %d synthetic volumes and participants.tsv to %s", len(paths), args.out)


def cmd_manifest(args) -> None:
    from brainddpm.data.prepare import run_manifest

    run_manifest(_config(args), args.manifest, args.excluded, jobs=args.jobs)


def cmd_split(args) -> None:
    from brainddpm.data.prepare import run_split

    run_split(_config(args), args.manifest, args.out)


def cmd_shard(args) -> None:
    from brainddpm.data.prepare import run_shard

    run_shard(_config(args), args.splits, args.split, args.index, args.out)


def cmd_index(args) -> None:
    from brainddpm.data.prepare import run_index

    run_index(args.split, args.shards, args.out)


def cmd_train(args) -> None:
    from brainddpm.config import validate_config
    from brainddpm.training.launch import run_training

    cfg = _config(args)
    if args.launch_json:  # the workflow passes `launch` apart: where a job runs does not retrain a model
        cfg = validate_config({**cfg, "launch": json.loads(args.launch_json)}, partial=True)
    info = run_training(cfg, args.shards, args.out)
    log.info("training finished: %s steps, final loss %s", info.get("steps"), info.get("final_loss"))


def cmd_sample(args) -> None:
    from brainddpm.sampling.sample import run_sample

    cfg = _config(args)
    run_sample(cfg["sample"], args.checkpoint, args.sampler, args.part, args.out, args.nifti_dir, args.sheet,
               args.plan)


def cmd_condition_plan(args) -> None:
    from brainddpm.config import load_config
    from brainddpm.sampling.plan import run_condition_plan

    if args.config:
        sample = load_config(args.config)["sample"]
        plan_cfg = {"n": sample["n"], "conditions": sample.get("conditions", "match_validation"),
                    "guidance_scale": sample.get("guidance_scale", 1.0)}
    elif args.n is None:
        raise BrainDDPMError("give --config, or --n (with --conditions-json and --guidance-scale)")
    else:
        plan_cfg = {"n": args.n, "conditions": json.loads(args.conditions_json), "guidance_scale": args.guidance_scale}
    run_condition_plan(plan_cfg, args.checkpoint, args.real, args.out)


def cmd_condition_check(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.condition_check import run_condition_check

    cfg = _config(args)
    run_condition_check(cfg["evaluate"]["bootstrap"], eval_seed(cfg), args.train, args.real, args.samples, args.out)


def cmd_features(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_features

    cfg = _config(args)
    run_features(cfg["evaluate"], eval_seed(cfg), args.real, args.samples, args.out, args.ids, args.device)


def cmd_bootstrap(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_bootstrap

    cfg = _config(args)
    ev = cfg["evaluate"]
    run_bootstrap(args.inputs, ev["bootstrap"], ev["jobs"], args.part, eval_seed(cfg), args.out)


def cmd_gather(args) -> None:
    from brainddpm.evaluation.evaluate import run_gather

    run_gather(args.inputs, args.ids, args.chunks, args.out)


def cmd_memorization(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_memorization

    cfg = _config(args)
    run_memorization(cfg["evaluate"]["memorization"], eval_seed(cfg), args.train, args.real, cfg["evaluate"]["n"],
                     args.samples, args.out)


def cmd_fetch_weights(args) -> None:
    from brainddpm.evaluation.medicalnet import download_weights

    download_weights(args.url, args.out)


def cmd_report(args) -> None:
    from brainddpm.evaluation.report import write_report

    if len(args.metrics) != len(args.samplers):
        raise BrainDDPMError("give one --metrics file per --samplers entry")
    parts = {s: sorted(p for p in args.samples if p.parent.name == s) for s in args.samplers}
    conditioning = None
    if args.conditioning:
        if len(args.conditioning) != len(args.samplers):
            raise BrainDDPMError("give one --conditioning file per --samplers entry")
        conditioning = dict(zip(args.samplers, args.conditioning))
    write_report(dict(zip(args.samplers, args.metrics)), args.memorization, args.train, args.real, parts,
                 args.run_dir, args.out, conditioning)


def cmd_bench(args) -> None:
    from brainddpm.bench import suite as bench

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
    p.add_argument("--ventricle-growth-mm", type=float, default=0.0,
                   help="lateral ventricles grow by this many mm from age 20 to 85 (default: 0, no such effect)")
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

    p = sub.add_parser("train", help="train the DDPM (submits through submitit and waits)",
                       description="Train the 3D DDPM on the training shards with DeepSpeed (or DDP), through "
                                   "submitit: a SLURM job (launch.executor: slurm), local processes (local) or this "
                                   "process (inprocess). Resumes from the latest checkpoint in OUT.")
    _config_args(p)
    p.add_argument("--launch-json", metavar="JSON",
                   help="the `launch` section as JSON, apart from --config-json (the workflow passes it as a "
                        "resource, so that changing where the job runs does not retrain a finished model)")
    p.add_argument("--shards", type=Path, required=True, help="training split folder (with index.json)")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. results/train/reference")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate synthetic volumes (one sampling job)",
                       description="Rebuild the model from the final checkpoint alone and sample the volumes of "
                                   "job PART (volume i always uses seed sample.base_seed + i).")
    _config_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors of a training run")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], required=True)
    p.add_argument("--part", type=int, required=True, help="job number, 0..sample.jobs-1")
    p.add_argument("--out", type=Path, required=True, help="output part-XXX.h5")
    p.add_argument("--nifti-dir", type=Path, required=True, help="folder for one NIfTI per volume")
    p.add_argument("--sheet", type=Path, help="PNG contact sheet of the part")
    p.add_argument("--plan", type=Path, help="conditions.json of `condition-plan` (conditional models only)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("condition-plan", help="conditional models: which covariates each synthetic volume asks for",
                       description="Write conditions.json: per synthetic volume the covariates it is sampled with "
                                   "(sample.conditions: match_validation takes validation volume i's for volume i; "
                                   "strata such as {age: [70, 80], sex: F, n: 50} give n volumes each) and "
                                   "sample.guidance_scale. The covariate encoding comes from the model file.")
    p.add_argument("--config", nargs="+", type=Path, metavar="YAML", help="config files (sample.n, "
                   "sample.conditions, sample.guidance_scale); or the three options below (the workflow)")
    p.add_argument("--n", type=int, help="synthetic volumes (sample.n)")
    p.add_argument("--conditions-json", default='"match_validation"',
                   help='sample.conditions as JSON: "match_validation" or a list of strata')
    p.add_argument("--guidance-scale", type=float, default=1.0, help="sample.guidance_scale (default: 1)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors of a conditional run")
    p.add_argument("--real", type=Path, required=True, help="validation split folder (match_validation)")
    p.add_argument("--out", type=Path, required=True, help="output conditions.json")
    p.set_defaults(func=cmd_condition_plan)

    p = sub.add_parser("features", help="precompute Gram matrices, MS-SSIM matrices and FID features",
                       description="Everything expensive of the evaluation, done once: bootstrap jobs only index it.")
    _config_args(p)
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample part files of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output inputs.npz")
    p.add_argument("--ids", type=Path, required=True, help="output ids.json (volumes used)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("bootstrap", help="one chunk of bootstrap resamples")
    _config_args(p)
    p.add_argument("--inputs", type=Path, required=True, help="inputs.npz from `features`")
    p.add_argument("--part", type=int, required=True, help="chunk number, 0..evaluate.jobs-1")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("gather", help="point estimates + bootstrap chunks -> metrics.json")
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True)
    p.add_argument("--chunks", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_gather)

    p = sub.add_parser("memorization", help="nearest-training-volume correlations of synthetic volumes")
    _config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_memorization)

    p = sub.add_parser("condition-check", help="conditional models: does the requested condition show?",
                       description="Fit covariate predictors (ridge / logistic regression on morphometrics and a "
                                   "pooled volume) on the real training split; score the validation split and the "
                                   "synthetic volumes against their requested covariates (MAE, accuracy, per "
                                   "stratum, ventricle-fraction effect), with bootstrap 95%% CIs.")
    _config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample parts of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output conditioning.json")
    p.set_defaults(func=cmd_condition_check)

    p = sub.add_parser("fetch-fid-weights", help="download MedicalNet weights (login node; needs internet)")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("report", help="write the report folder")
    p.add_argument("--samplers", nargs="+", required=True)
    p.add_argument("--metrics", type=Path, nargs="+", required=True, help="metrics.json per sampler, same order")
    p.add_argument("--memorization", type=Path, required=True)
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="all sample part files")
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--run-dir", type=Path, required=True, help="training run folder (loss.png, train.json)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--conditioning", type=Path, nargs="+",
                   help="conditional models: conditioning.json per sampler, same order as --samplers")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="benchmarks that print their figures (data, train, eval, sampling)",
                       description="Measure throughput; figures are printed and can go in docs/benchmarks.md.")
    bsub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    b = bsub.add_parser("data", help="NIfTI load+preprocess vs shard reads (volumes/s)")
    b.add_argument("--n", type=int, default=16, help="volumes to measure (default: 16)")
    b.add_argument("--target-shape", type=int, nargs=3, default=[84, 128, 84])
    b.add_argument("--workdir", type=Path, default=Path("results/bench"), help="scratch folder")
    b.add_argument("--compare-codecs", action="store_true", help="also measure size and read speed per codec")
    b = bsub.add_parser("train", help="training steps/s, samples/s, MFU, peak memory on this device")
    b.add_argument("--preset", choices=["paper", "demo"], default="paper", help="model preset (default: paper)")
    b.add_argument("--batch", type=int, default=1, help="micro-batch (default: 1)")
    b.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps (default: 10)")
    b.add_argument("--target-shape", type=int, nargs=3, help="override the preset's target shape")
    b.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present")
    b.add_argument("--backend", choices=["deepspeed", "accelerate", "ddp"],
                   help="training engine to time (default: the preset's train.backend)")
    b.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the preset's train.precision")
    b.add_argument("--compile", action="store_true", help="train.compile: torch.compile the UNet (CUDA only)")
    b = bsub.add_parser("eval", help="one point evaluation of all metrics vs the bootstrap resamples")
    b.add_argument("--n", type=int, default=86)
    b.add_argument("--shape", type=int, nargs=3, default=[84, 128, 84])
    b.add_argument("--kernel", type=int, default=5)
    b.add_argument("--scales", type=int, default=5)
    b.add_argument("--bootstrap", type=int, default=1000)
    b.add_argument("--jobs", type=int, default=4)
    b.add_argument("--device", default="auto")
    b = bsub.add_parser("sampling", help="DDPM (all steps) vs DDIM wall time on one trained model")
    b.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors")
    b.add_argument("--n", type=int, default=4, help="volumes per sampler (default: 4)")
    b.add_argument("--ddim-steps", type=int, default=50)
    b.add_argument("--device", default="auto")
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
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        # unreadable or inconsistent inputs that no check above caught: one clear line (traceback with -v)
        if args.verbose:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"brainddpm {args.command}: error: {type(exc).__name__}{where}: {exc} (rerun with -v for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
