"""The training stage's subcommands: train and train-autoencoder (the rules of train.smk and latent.smk)."""

from __future__ import annotations

import json
from pathlib import Path

from brainddpm.arguments import config_args, load_args_config, log, performance_args, with_performance


def _training_config(args, overrides: dict | None = None) -> dict:
    from brainddpm.config import validate_config

    cfg = load_args_config(args, overrides)
    if args.launch_json:  # the workflow passes `launch` apart: where a job runs does not retrain a model
        cfg = validate_config({**cfg, "launch": json.loads(args.launch_json)}, partial=True)
    return with_performance(cfg, args)


def cmd_train(args) -> None:
    from brainddpm.training.launch import run_training

    info = run_training(_training_config(args), args.shards, args.out)
    log.info("training finished: %s steps, final loss %s", info.get("steps"), info.get("final_loss"))


def autoencoder_job_config(args) -> dict:
    """The autoencoder's training config: --config or --config-json, `launch` and `--use-checkpoint` (both kept
    apart from it by the workflow: no rerun triggers) merged in, autoencoder.train over train.*."""
    from brainddpm.config import autoencoder_training
    from brainddpm.errors import ConfigError

    overrides = {"autoencoder": {"use_checkpoint": args.use_checkpoint == "true"}} if args.use_checkpoint else None
    cfg = _training_config(args, overrides)
    if "use_checkpoint" not in cfg["autoencoder"]:  # a job's --config-json may leave it out: the flag must say it
        raise ConfigError("config key 'autoencoder.use_checkpoint': missing; pass --use-checkpoint true|false "
                          "(the workflow's train_autoencoder rule does)")
    return autoencoder_training(cfg)


def cmd_train_autoencoder(args) -> None:
    from brainddpm.training.launch import run_training

    info = run_training(autoencoder_job_config(args), args.shards, args.out, kind="autoencoder")
    log.info("autoencoder training finished: %s steps, final loss %s", info.get("steps"), info.get("final_loss"))


def cmd_fetch_perceptual_weights(args) -> None:
    from monai.losses import PerceptualLoss

    from brainddpm.fileio import atomic_path

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    PerceptualLoss(spatial_dims=3, network_type=args.network, is_fake_3d=False, cache_dir=str(args.cache_dir))
    with atomic_path(args.marker) as tmp:  # torch.hub wrote the network's code and weights: say so for the rule
        tmp.write_text(f"{args.network}\n")
    log.info("%s is in %s (torch.hub cache); training jobs read it from there", args.network, args.cache_dir)


def _launch_args(p) -> None:
    config_args(p)
    p.add_argument("--launch-json", metavar="JSON",
                   help="the `launch` section as JSON, apart from --config-json (the workflow passes it as a "
                        "resource, so that changing where the job runs does not retrain a finished model)")
    performance_args(p)


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train the DDPM (submits through submitit and waits)",
                       description="Train the 3D DDPM on the training shards with DeepSpeed (or DDP), through "
                                   "submitit: a SLURM job (launch.executor: slurm), local processes (local) or this "
                                   "process (inprocess). Resumes from the latest checkpoint in OUT.")
    _launch_args(p)
    p.add_argument("--shards", type=Path, required=True,
                   help="training split folder (with index.json): image shards, or latent shards for model.kind: "
                        "latent")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. results/train/reference")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("train-autoencoder", help="train the autoencoder of latent diffusion (model.kind: latent)",
                       description="Train MONAI's AutoencoderKL (the `autoencoder` section: L1 + KL, optional "
                                   "adversarial and perceptual losses, whole volumes or random patches) on the "
                                   "training image shards, with the same engine, backends, launcher, checkpoints and "
                                   "resume as "
                                   "`train`; autoencoder.train overrides train.* for it. Writes OUT/autoencoder."
                                   "safetensors, which holds the latent scale factor (1/std of the training latents).")
    _launch_args(p)
    p.add_argument("--shards", type=Path, required=True, help="training split folder of the image shards")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. results/autoencoder/reference")
    p.add_argument("--use-checkpoint", choices=["true", "false"],
                   help="autoencoder.use_checkpoint apart from --config-json (the workflow passes it as a resource: "
                        "activation checkpointing trades memory for time, and switching it retrains nothing)")
    p.set_defaults(func=cmd_train_autoencoder)
    p = sub.add_parser("fetch-perceptual-weights", help="download the perceptual loss's network (needs internet)",
                       description="Fetch MONAI's 3D MedicalNet network for the autoencoder's perceptual loss into a "
                                   "torch.hub cache folder (autoencoder.perceptual.cache_dir), where training jobs, "
                                   "which never download, read it. Run it on a login node.")
    p.add_argument("--network", default="medicalnet_resnet10_23datasets", help="autoencoder.perceptual.network")
    p.add_argument("--cache-dir", type=Path, required=True, help="autoencoder.perceptual.cache_dir")
    p.add_argument("--marker", type=Path, required=True, help="file written once the network is there")
    p.set_defaults(func=cmd_fetch_perceptual_weights)
