"""What every stage's subcommands share: the `--config`/`--config-json` options and reading them.

The stages declare their own subcommands (`<stage>/commands.py`), and `cli.py` assembles them; both
import this module, which imports no stage (and `brainddpm.config` only when a command runs, so that
`brainddpm --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("brainddpm")


def config_args(p: argparse.ArgumentParser) -> None:
    """Add the required choice between `--config YAML...` (by hand) and `--config-json` (the workflow)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                   help="config files merged in order (e.g. config/config.yaml config/demo.yaml)")
    g.add_argument("--config-json", metavar="JSON", help="validated config sections as JSON (used by the workflow)")


def load_args_config(args) -> dict:
    """The configuration that `config_args` asked for, validated (in part, for `--config-json`)."""
    from brainddpm.config import load_config, validate_config

    if args.config_json:
        return validate_config(json.loads(args.config_json), partial=True)
    return load_config(args.config)


def performance_args(p: argparse.ArgumentParser) -> None:
    """Add `--performance-json`: the `performance` section apart from `--config-json` (the workflow passes it
    as a resource: how fast a job runs is no rerun trigger)."""
    p.add_argument("--performance-json", metavar="JSON",
                   help="the `performance` section as JSON (compile, channels-last, bf16 GroupNorm), apart from "
                        "--config-json; it overrides a `performance` section of --config")


def with_performance(cfg: dict, args) -> dict:
    """`cfg` with the `--performance-json` section in place, validated."""
    if not getattr(args, "performance_json", None):
        return cfg
    from brainddpm.config import validate_config

    return validate_config({**cfg, "performance": json.loads(args.performance_json)}, partial=True)
