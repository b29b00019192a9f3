"""The training stage's subcommand: train (the rule of train.smk)."""

from __future__ import annotations

import json
from pathlib import Path

from brainddpm.commandline import config_args, load_args_config, log, performance_args, with_performance


def cmd_train(args) -> None:
    from brainddpm.config import validate_config
    from brainddpm.training.launch import run_training

    cfg = load_args_config(args)
    if args.launch_json:  # the workflow passes `launch` apart: where a job runs does not retrain a model
        cfg = validate_config({**cfg, "launch": json.loads(args.launch_json)}, partial=True)
    info = run_training(with_performance(cfg, args), args.shards, args.out)
    log.info("training finished: %s steps, final loss %s", info.get("steps"), info.get("final_loss"))


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train the DDPM (submits through submitit and waits)",
                       description="Train the 3D DDPM on the training shards with DeepSpeed (or DDP), through "
                                   "submitit: a SLURM job (launch.executor: slurm), local processes (local) or this "
                                   "process (inprocess). Resumes from the latest checkpoint in OUT.")
    config_args(p)
    p.add_argument("--launch-json", metavar="JSON",
                   help="the `launch` section as JSON, apart from --config-json (the workflow passes it as a "
                        "resource, so that changing where the job runs does not retrain a finished model)")
    performance_args(p)
    p.add_argument("--shards", type=Path, required=True, help="training split folder (with index.json)")
    p.add_argument("--out", type=Path, required=True, help="run folder, e.g. results/train/reference")
    p.set_defaults(func=cmd_train)
