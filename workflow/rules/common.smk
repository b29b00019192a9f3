# Config validation, paths and targets. Logic lives in src/brainddpm.
import os

from brainddpm.config import dumps, validate_config
from brainddpm.errors import ConfigError

try:
    validate_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")

R = config["results"]
RUN = config["run"]
DEMO_DIR = config["demo"]["out"]
DEMO_PARTICIPANTS = f"{DEMO_DIR}/participants.tsv" if config["demo"]["enabled"] else []


wildcard_constraints:
    split="train|val",
    i=r"\d{4}",


def stage_config(*sections):
    """JSON of the config sections a step uses: rules rerun when (only) these change."""
    return dumps({k: config[k] for k in sections})


def shard_files(wildcards):
    """Shards of one split, known once the split checkpoint has run."""
    from brainddpm.prepare import n_shards

    splits = checkpoints.split.get().output.splits
    n = n_shards(splits, wildcards.split, config["data"]["volumes_per_shard"])
    return [f"{R}/shards/{wildcards.split}/shard-{i:04d}.h5" for i in range(n)]


def prepare_targets():
    return expand(f"{R}/shards/{{split}}/index.json", split=["train", "val"])


def all_targets():
    return prepare_targets()
