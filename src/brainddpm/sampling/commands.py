"""The sampling stage's subcommands: sample, mask-rule and condition-plan (the rules of sample.smk), and to-mni."""

from __future__ import annotations

import json
from pathlib import Path

from brainddpm.arguments import config_args, load_args_config, load_config_files, performance_args, with_performance
from brainddpm.errors import BrainDDPMError


def cmd_sample(args) -> None:
    from brainddpm.config import performance_section
    from brainddpm.sampling.sample import run_sample

    cfg = with_performance(load_args_config(args), args)
    run_sample(cfg["sample"], args.checkpoint, args.sampler, args.part, args.out, args.nifti_dir, args.sheet,
               args.plan, performance_section(cfg), args.autoencoder, cfg.get("decode"), args.mask_rule)


def cmd_mask_rule(args) -> None:
    from brainddpm.sampling.background import run_mask_rule

    run_mask_rule(args.train, args.out)


def cmd_condition_plan(args) -> None:
    from brainddpm.sampling.plan import run_condition_plan

    if args.config:
        sample = load_config_files(args.config)["sample"]
        plan_cfg = {"n": sample["n"], "conditions": sample.get("conditions", "match_validation"),
                    "guidance_scale": sample.get("guidance_scale", 1.0)}
    elif args.n is None:
        raise BrainDDPMError("give --config, or --n (with --conditions-json and --guidance-scale)")
    else:
        plan_cfg = {"n": args.n, "conditions": json.loads(args.conditions_json), "guidance_scale": args.guidance_scale}
    run_condition_plan(plan_cfg, args.checkpoint, args.real, args.out, args.train)


def cmd_to_mni(args) -> None:
    from brainddpm.sampling.sample import resample_to_grid

    grid = load_config_files(args.config)["data"]["grid"]
    for path in args.files:
        out = resample_to_grid(path, grid, args.out)
        print(out)


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate synthetic volumes (one sampling job)",
                       description="Rebuild the model from the final checkpoint alone and sample the volumes of "
                                   "job PART (volume i always uses seed sample.base_seed + i).")
    config_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors of a training run")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "rflow"], required=True,
                   help="ddpm (all scheduler steps) or ddim (sample.ddim_steps steps) for a DDPM-trained model; "
                        "rflow (sample.rflow_steps Euler steps) for a rectified-flow one (scheduler.kind: rflow)")
    p.add_argument("--part", type=int, required=True, help="job number, 0..sample.jobs-1")
    p.add_argument("--out", type=Path, required=True, help="output part-XXX.h5")
    p.add_argument("--nifti-dir", type=Path, required=True, help="folder for one NIfTI per volume")
    p.add_argument("--sheet", type=Path, help="PNG contact sheet of the part")
    p.add_argument("--plan", type=Path, help="conditions.json of `condition-plan` (conditional models only)")
    p.add_argument("--autoencoder", type=Path,
                   help="latent models only: the autoencoder.safetensors whose latents trained the model (it decodes "
                        "the sampled latents; the config's `decode` section says whole or by windows)")
    p.add_argument("--mask-rule", type=Path,
                   help="mask_rule.json of `brainddpm mask-rule` (sample.background: mask sets each volume's "
                        "background to 0 outside its brain mask, written beside it as _mask.nii.gz)")
    performance_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("mask-rule", help="choose the brain-mask rule for synthetic volumes on the training split",
                       description="Write mask_rule.json: the threshold and dilation of the rule that masks "
                                   "synthetic volumes (threshold, largest component, holes filled, dilated into "
                                   "non-zero voxels), the tightest pair of a grid that keeps 99.5 % of every "
                                   "training brain (at most 64 evenly spaced training volumes). Read by "
                                   "`brainddpm sample` under sample.background: mask.")
    p.add_argument("--train", type=Path, required=True, help="the training split's shard folder (index.json)")
    p.add_argument("--out", type=Path, required=True, help="output mask_rule.json")
    p.set_defaults(func=cmd_mask_rule)

    p = sub.add_parser("condition-plan", help="conditional models: which covariates each synthetic volume asks for",
                       description="Write conditions.json: per synthetic volume the covariates it is sampled with "
                                   "(sample.conditions: match_validation takes validation volume i's for volume i, "
                                   "match_training training volume i's; "
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
    p.add_argument("--train", type=Path, help="training split folder (match_training: volume i takes training volume "
                                              "i's covariates, the utility stage's plan)")
    p.add_argument("--out", type=Path, required=True, help="output conditions.json")
    p.set_defaults(func=cmd_condition_plan)

    p = sub.add_parser("to-mni", help="copy synthetic NIfTI onto the 1 mm MNI grid (for tools that expect it)",
                       description="Resample synthetic volumes (written at the model's shape, e.g. 2.15x1.70x2.15 "
                                   "mm voxels at 84x128x84) onto data.grid, the MNI 1 mm grid the inputs were "
                                   "resampled to, trilinearly; writes <name>_mni1mm.nii.gz into --out. The "
                                   "originals stay as they are.")
    p.add_argument("--config", nargs="+", type=Path, metavar="YAML", required=True,
                   help="the run's config files (data.grid)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("files", type=Path, nargs="+", metavar="NIFTI", help="synthetic NIfTI files")
    p.set_defaults(func=cmd_to_mni)
