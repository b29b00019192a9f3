"""The evaluation stage's subcommands: features, bootstrap, gather, memorization, condition-check, realism-probe,
fetch-fid-weights (the rules of evaluate.smk) and report (report.smk)."""

from __future__ import annotations

from pathlib import Path

from brainddpm.arguments import config_args, load_args_config
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


def cmd_realism_probe(args) -> None:
    from brainddpm.config import eval_seed
    from brainddpm.evaluation.realism import run_realism_probe

    cfg = load_args_config(args)
    ev = cfg["evaluate"]
    run_realism_probe(ev["realism"], ev["n"], ev["bootstrap"], eval_seed(cfg), args.real, args.samples, args.out,
                      args.png, args.nifti)


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
    if args.realism and len(args.realism) != len(args.samplers):
        raise BrainDDPMError("give one --realism file per --samplers entry")
    write_report(dict(zip(args.samplers, args.metrics)), args.memorization, args.train, args.real, parts,
                 args.run_dir, args.out, conditioning, reconstruction=args.reconstruction, compare=args.compare,
                 utility=args.utility, qc_dir=args.qc_dir,
                 realism_files=dict(zip(args.samplers, args.realism)) if args.realism else None)


def add_commands(sub) -> None:
    _add_metric_commands(sub)
    _add_check_commands(sub)
    _add_report_commands(sub)


def _add_metric_commands(sub) -> None:
    """The study's metrics: features once, bootstrap chunks, gathered into metrics.json."""
    p = sub.add_parser("features", help="precompute Gram matrices, MS-SSIM matrices and FID features",
                       description="Everything expensive of the evaluation, done once: bootstrap jobs only index it.")
    config_args(p)
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample part files of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output inputs.npz")
    p.add_argument("--ids", type=Path, required=True, help="output ids.json (volumes used)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("bootstrap", help="one chunk of bootstrap resamples",
                       description="Draw this chunk's share of the evaluate.bootstrap resamples (subject-level) "
                                   "and score every metric on each from the matrices of `features`; `gather` "
                                   "combines the chunks into confidence intervals.")
    config_args(p)
    p.add_argument("--inputs", type=Path, required=True, help="inputs.npz from `features`")
    p.add_argument("--part", type=int, required=True, help="chunk number, 0..evaluate.jobs-1")
    p.add_argument("--out", type=Path, required=True, help="output chunk-XXX.npz")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("gather", help="point estimates + bootstrap chunks -> metrics.json",
                       description="Compute each metric's point estimate on the full sets and its 95% CI from "
                                   "every bootstrap chunk; write metrics.json (the report's table).")
    p.add_argument("--inputs", type=Path, required=True, help="inputs.npz from `features`")
    p.add_argument("--ids", type=Path, required=True, help="ids.json from `features`")
    p.add_argument("--chunks", type=Path, nargs="+", required=True, help="every chunk-XXX.npz from `bootstrap`")
    p.add_argument("--out", type=Path, required=True, help="output metrics.json")
    p.set_defaults(func=cmd_gather)


def _add_check_commands(sub) -> None:
    """The checks beside the metrics: memorization, the condition check, the autoencoder's reconstruction."""
    p = sub.add_parser("memorization", help="nearest-training-volume correlations of synthetic volumes",
                       description="Each synthetic volume's highest correlation with a training volume (inside "
                                   "the brain mask), beside the real validation volumes' own: synthetic volumes "
                                   "above the validation volumes' evaluate.memorization.percentile are flagged as "
                                   "possible copies; write memorization.json.")
    config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True,
                   help="sample part files of every sampler (samples/{run}/{sampler}/part-*.h5): each sampler's "
                        "volumes are checked")
    p.add_argument("--out", type=Path, required=True, help="output memorization.json")
    p.set_defaults(func=cmd_memorization)

    p = sub.add_parser("condition-check", help="conditional models: does the requested condition show?",
                       description="Fit covariate predictors (ridge / logistic regression on morphometrics and a "
                                   "pooled volume) on the real training split; score the validation split and the "
                                   "synthetic volumes against their requested covariates (MAE, accuracy, per "
                                   "stratum, ventricle-fraction effect), with bootstrap 95% CIs.")
    config_args(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder")
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample parts of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output conditioning.json")
    p.set_defaults(func=cmd_condition_check)

    p = sub.add_parser("realism-probe", help="what tells one sampler's volumes from real ones?",
                       description="Four linear probes (standardisation, PCA, logistic regression; cross-validated "
                                   "by subject) tell the validation volumes from one sampler's synthetic ones on: "
                                   "(a) the whole volume, (b) the core brain only, (c) the intensity histogram "
                                   "inside it, (d) fine texture (the volume minus a smoothed copy); and on the "
                                   "unmasked volumes when the background was masked. Balanced accuracy with "
                                   "bootstrap 95% CIs, a verdict naming the tell, and the whole-volume probe's "
                                   "evidence map (NIfTI and PNG): realism.json.")
    config_args(p)
    p.add_argument("--real", type=Path, required=True, help="validation split folder")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample parts of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output realism.json")
    p.add_argument("--png", type=Path, required=True, help="output evidence figure (over the mean real brain)")
    p.add_argument("--nifti", type=Path, required=True, help="output evidence map as NIfTI")
    p.set_defaults(func=cmd_realism_probe)

    p = sub.add_parser("reconstruction",
                       help="latent diffusion: how well the autoencoder reconstructs validation volumes",
                       description="Encode and decode every validation volume as sampling decodes a latent (the "
                                   "`decode` section); PSNR, SSIM and MAE per volume, means with subject-level "
                                   "bootstrap 95% CIs (evaluate.bootstrap resamples): the latent model's ceiling.")
    config_args(p)
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder.safetensors (train-autoencoder)")
    p.add_argument("--real", type=Path, required=True, help="validation split folder (image shards)")
    p.add_argument("--out", type=Path, required=True, help="output reconstruction.json")
    p.add_argument("--png", type=Path, help="output figure: validation volumes and their reconstructions")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: a free GPU, else CPU")
    p.set_defaults(func=cmd_reconstruction)


def _add_report_commands(sub) -> None:
    """FID's weights (fetched on a login node) and the report."""
    p = sub.add_parser("fetch-fid-weights", help="download MedicalNet weights (login node; needs internet)",
                       description="Download the MedicalNet weights that FID's features need (evaluate.fid.url "
                                   "to evaluate.fid.weights), on a machine with internet: compute nodes have none.")
    p.add_argument("--url", required=True, help="where to download them from (evaluate.fid.url)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .pth file (written under a temporary name, renamed when complete)")
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("report", help="write the report folder",
                       description="Write report.md (and report.html, the same as one page), the metrics table "
                                   "(md, csv, json) and the figures from the evaluation's outputs: the reference "
                                   "study's table, a verdict, memorization, and the conditional, latent and "
                                   "utility sections when present.")
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
    p.add_argument("--realism", type=Path, nargs="+",
                   help="realism.json per sampler (realism-probe), same order as --samplers: the 'Realism' section "
                        "and the verdict's realism clause")
    p.add_argument("--qc-dir", type=Path,
                   help="the qc rule's folder (qc.tsv, data_summary.json, worst.png): the report's 'Data' section")
    p.set_defaults(func=cmd_report)
