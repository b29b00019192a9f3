"""The argparse options every stage's subcommands share: `--config`/`--config-json`, `--performance-json`, and
reading them.

The stages declare their own subcommands (`<stage>/commands.py`), and `cli.py` (the entry point) assembles
them; both import this module, which imports no stage (and `brainddpm.config` only when a command runs, so
that `brainddpm --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("brainddpm")
PERFORMANCE_VARIABLE = "BRAINDDPM_PERFORMANCE"


def config_args(p: argparse.ArgumentParser) -> None:
    """Add the required choice between `--config YAML...` (by hand) and `--config-json` (the workflow)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", nargs="+", type=Path, metavar="YAML",
                   help="config files merged in order (e.g. config/config.yaml config/demo.yaml)")
    g.add_argument("--config-json", metavar="JSON", help="validated config sections as JSON (used by the workflow)")


DEFAULTS_FILE = "config/config.yaml"  # every key's default: the first of a command's --config files


def load_config_files(paths: list[Path]) -> dict:
    """`brainddpm.config.load_config`, with a hint when a key is missing because the defaults file is not the
    first of the files (`--config my.yaml` alone, as one is tempted to type)."""
    from brainddpm.config import load_config
    from brainddpm.errors import ConfigError

    try:
        return load_config(paths)
    except ConfigError as exc:
        if "': missing" not in str(exc) or not paths or Path(paths[0]).name == Path(DEFAULTS_FILE).name:
            raise
        files = " ".join(str(p) for p in paths)
        raise ConfigError(f"{exc}; {DEFAULTS_FILE} (every default) comes first, then your own files: "
                          f"--config {DEFAULTS_FILE} {files}") from None


def load_args_config(args, overrides: dict | None = None) -> dict:
    """The configuration that `config_args` asked for, validated (in part, for `--config-json`); `overrides`:
    keys a command takes apart from the config (merged over it, before the validation)."""
    from brainddpm.config import deep_merge, validate_config

    if args.config_json:
        return validate_config(deep_merge(json.loads(args.config_json), overrides or {}), partial=True)
    cfg = load_config_files(args.config)
    return validate_config(deep_merge(cfg, overrides)) if overrides else cfg


def performance_args(p: argparse.ArgumentParser) -> None:
    """Add `--performance-json`: the `performance` section apart from the rest of the config."""
    p.add_argument("--performance-json", metavar="JSON",
                   help="the `performance` section as JSON (compile, channels-last, bf16 GroupNorm); default: "
                        f"${PERFORMANCE_VARIABLE}, which the workflow sets for its jobs (how fast a job runs is no "
                        "rerun trigger); either overrides a `performance` section of --config")


def with_performance(cfg: dict, args) -> dict:
    """`cfg` with the `--performance-json` (or $BRAINDDPM_PERFORMANCE) section in place, validated."""
    text = getattr(args, "performance_json", None) or os.environ.get(PERFORMANCE_VARIABLE)
    if not text:
        return cfg
    from brainddpm.config import validate_config
    from brainddpm.errors import ConfigError

    try:
        section = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'performance': not JSON ({exc}): {text!r}") from None
    return validate_config({**cfg, "performance": section}, partial=True)
