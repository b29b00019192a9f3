"""The `brainddpm` command, its entry point: it assembles every stage's subcommands, one per pipeline step.

Each stage declares its own subcommands next to the code they call (`data/commands.py`,
`training/commands.py`, `encoding/commands.py`, `sampling/commands.py`, `evaluation/commands.py`,
`utility/commands.py`, `bench/commands.py`); each
subcommand parses its arguments and calls one library function, imported only when it runs. The
Snakemake rules in workflow/rules/ call these subcommands. Configuration comes either from YAML files
(`--config config/config.yaml config/demo.yaml`, merged in order and validated) or, from the
workflow, as the already-validated JSON of the sections a step needs (`--config-json`); both options
are in arguments.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from brainddpm import __version__
from brainddpm.bench import commands as bench_commands
from brainddpm.data import commands as data_commands
from brainddpm.encoding import commands as encoding_commands
from brainddpm.errors import BrainDDPMError
from brainddpm.evaluation import commands as evaluation_commands
from brainddpm.sampling import commands as sampling_commands
from brainddpm.training import commands as training_commands
from brainddpm.utility import commands as utility_commands

# in the order of the pipeline: `brainddpm --help` lists the subcommands in this order
STAGES = (data_commands, training_commands, encoding_commands, sampling_commands, evaluation_commands,
          utility_commands, bench_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainddpm",
        description="Train, sample and evaluate a 3D DDPM of T1-weighted brain MRI. Normally run through "
                    "Snakemake (`snakemake --profile profiles/local`); each subcommand is one pipeline step.",
    )
    parser.add_argument("--version", action="version", version=f"brainddpm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.add_commands(sub)
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
