"""The evaluation stage's subcommands: features, bootstrap, gather, memorization, condition-check,
fetch-fid-weights (the rules of evaluate.smk) and report (report.smk)."""

from __future__ import annotations

from pathlib import Path

from brainddpm.commandline import config_args, load_args_config
from brainddpm.errors import BrainDDPMError


def cmd_condition_check(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.condition_check import run_condition_check

    cfg = load_args_config(args)
    run_condition_check(cfg["evaluate"]["bootstrap"], eval_seed(cfg), args.train, args.real, args.samples, args.out)


def cmd_features(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_features

    cfg = load_args_config(args)
    run_features(cfg["evaluate"], eval_seed(cfg), args.real, args.samples, args.out, args.ids, args.device)


def cmd_bootstrap(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_bootstrap

    cfg = load_args_config(args)
    ev = cfg["evaluate"]
    run_bootstrap(args.inputs, ev["bootstrap"], ev["jobs"], args.part, eval_seed(cfg), args.out)


def cmd_gather(args) -> None:
    from brainddpm.evaluation.evaluate import run_gather

    run_gather(args.inputs, args.ids, args.chunks, args.out)


def cmd_memorization(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.evaluate import run_memorization

    cfg = load_args_config(args)
    run_memorization(cfg["evaluate"]["memorization"], eval_seed(cfg), args.train, args.real, cfg["evaluate"]["n"],
                     args.samples, args.out)


def cmd_fetch_weights(args) -> None:
    from brainddpm.evaluation.medicalnet import download_weights

    download_weights(args.url, args.out)


def cmd_reconstruction(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.reconstruction import run_reconstruction

    cfg = load_args_config(args)
    run_reconstruction(args.autoencoder, args.real, cfg.get("decode"), eval_seed(cfg), cfg["evaluate"]["bootstrap"],
                       args.out, args.png, args.device)


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
                 args.run_dir, args.out, conditioning, reconstruction=args.reconstruction, compare=args.compare,
                 utility=args.utility)


def add_commands(sub) -> None:
    p = sub.add_parser("features", help="precompute Gram matrices, MS-SSIM matrices and FID features",
                       description="Everything expensive of the evaluation, done once: bootstrap jobs only index it.")
    config_args(p)
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample part files of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output inputs.npz")
    p.add_argument("--ids", type=Path, required=True, help="output ids.json (volumes used)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("bootstrap", help="one chunk of bootstrap resamples")
    config_args(p)
    p.add_argument("--inputs", type=Path, required=True, help="inputs.npz from `features`")
    p.add_argument("--part", type=int, required=True, help="chunk number, 0..evaluate.jobs-1")
    p.add_argument("--out", type=Path, required=True, help="output chunk-XXX.npz")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("gather", help="point estimates + bootstrap chunks -> metrics.json")
    p.add_argument("--inputs", type=Path, required=True, help="inputs.npz from `features`")
    p.add_argument("--ids", type=Path, required=True, help="ids.json from `features`")
    p.add_argument("--chunks", type=Path, nargs="+", required=True, help="every chunk-XXX.npz from `bootstrap`")
    p.add_argument("--out", type=Path, required=True, help="output metrics.json")
    p.set_defaults(func=cmd_gather)

    p = sub.add_parser("memorization", help="nearest-training-volume correlations of synthetic volumes")
    config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample part files of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output memorization.json")
    p.set_defaults(func=cmd_memorization)

    p = sub.add_parser("condition-check", help="conditional models: does the requested condition show?",
                       description="Fit covariate predictors (ridge / logistic regression on morphometrics and a "
                                   "pooled volume) on the real training split; score the validation split and the "
                                   "synthetic volumes against their requested covariates (MAE, accuracy, per "
                                   "stratum, ventricle-fraction effect), with bootstrap 95%% CIs.")
    config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample parts of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output conditioning.json")
    p.set_defaults(func=cmd_condition_check)

    p = sub.add_parser("reconstruction", help="latent diffusion: how well the autoencoder reconstructs validation volumes",
                       description="Encode and decode every validation volume as sampling decodes a latent (the "
                                   "`decode` section); PSNR, SSIM and MAE per volume, means with subject-level "
                                   "bootstrap 95%% CIs (evaluate.bootstrap resamples): the latent model's ceiling.")
    config_args(p)
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder.safetensors (train-autoencoder)")
    p.add_argument("--real", type=Path, required=True, help="validation split folder (image shards)")
    p.add_argument("--out", type=Path, required=True, help="output reconstruction.json")
    p.add_argument("--png", type=Path, help="output figure: validation volumes and their reconstructions")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: a free GPU, else CPU")
    p.set_defaults(func=cmd_reconstruction)

    p = sub.add_parser("fetch-fid-weights", help="download MedicalNet weights (login node; needs internet)")
    p.add_argument("--url", required=True, help="where to download them from (evaluate.fid.url)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .pth file (written under a temporary name, renamed when complete)")
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("report", help="write the report folder")
    p.add_argument("--samplers", nargs="+", required=True, help="samplers to report (e.g. ddpm ddim)")
    p.add_argument("--metrics", type=Path, nargs="+", required=True, help="metrics.json per sampler, same order")
    p.add_argument("--memorization", type=Path, required=True, help="memorization.json of `memorization`")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="all sample part files")
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--run-dir", type=Path, required=True, help="training run folder (loss.png, train.json)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--conditioning", type=Path, nargs="+",
                   help="conditional models: conditioning.json per sampler, same order as --samplers")
    p.add_argument("--reconstruction", type=Path, help="latent models: reconstruction.json of `reconstruction`")
    p.add_argument("--compare", type=Path,
                   help="another run's report/metrics.json, shown beside this run's (e.g. the pixel demo's)")
    p.add_argument("--utility", type=Path,
                   help="utility.json of `utility-gather` (utility.enabled): the report's 'Utility' section")
    p.set_defaults(func=cmd_report)
