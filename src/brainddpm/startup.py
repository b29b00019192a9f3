"""What the workflow checks before its first job, beyond the schema (config.validate_config): the site.

The schema checks a config's keys and values; these checks need the site the run starts on: input paths
that must exist (the datasets' roots, globs and participants tables; the demo cohort's are written by its
own rule, so they are not), the SLURM account (`launch.account`, or by default the environment variable
that the SLURM profiles read, so one setting serves both) and a LEONARDO QOS whose time limit is shorter
than `launch.time_min`. Each failure is a ConfigError naming the key and the path or value, raised in
the workflow's startup (`snakemake -n` included), before any job runs. `train_submission` says in one line
what the `train` rule will submit, since Snakemake's own table shows the resources of the local rule that
only submits and waits.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from brainddpm.errors import ConfigError

ACCOUNT_VARIABLE = "BRAINDDPM_SLURM_ACCOUNT"  # what profiles/leonardo and profiles/slurm pass as slurm_account

# LEONARDO Booster (partition boost_usr_prod): the QOS time limits of CINECA's user guide, in minutes.
# `sacctmgr show qos format=name,maxwall` on a login node shows the ones in force.
LEONARDO_QOS_MINUTES = {"normal": 1440, "boost_qos_dbg": 30, "boost_qos_bprod": 1440, "boost_qos_lprod": 5760}


def _inside(path: str, folder: str) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def check_datasets(cfg: dict) -> None:
    """Every dataset's root (a folder), glob (matching at least one file) and participants table exist.

    Paths inside the demo cohort's folder are skipped while the demo is enabled: its rule writes them.
    """
    datasets = cfg["datasets"]  # not empty: config.validate_config refuses that, in every job too
    demo_out = cfg["demo"]["out"] if cfg["demo"]["enabled"] else None

    def pending(path: str) -> bool:
        return demo_out is not None and _inside(path, demo_out)

    for i, ds in enumerate(datasets):
        key = f"datasets[{i}] ({ds['name']})"
        if "root" in ds and not pending(ds["root"]) and not Path(ds["root"]).is_dir():
            what = "is not a folder" if Path(ds["root"]).exists() else "does not exist"
            raise ConfigError(f"config key '{key}.root': {ds['root']} {what}")
        if "glob" in ds and not pending(ds["glob"].split("*")[0] or ".") \
                and not any(Path(p).is_file() for p in glob.iglob(ds["glob"], recursive=True)):
            raise ConfigError(f"config key '{key}.glob': {ds['glob']} matches no file")
        table = ds.get("participants")
        if table and not pending(table) and not Path(table).is_file():
            raise ConfigError(f"config key '{key}.participants': {table} does not exist")


def resolve_account(launch: dict, environ=os.environ) -> dict:
    """`launch` with the account filled in from $BRAINDDPM_SLURM_ACCOUNT when `launch.account` is not set."""
    if launch.get("account") or launch.get("account") is False or not environ.get(ACCOUNT_VARIABLE):
        return launch
    return {**launch, "account": environ[ACCOUNT_VARIABLE]}


def check_launch_site(launch: dict, environ=os.environ) -> None:
    """A SLURM run has an account, and on LEONARDO a QOS whose time limit holds `launch.time_min`."""
    if launch["executor"] != "slurm":
        return
    if not (launch.get("account") or launch.get("account") is False or environ.get(ACCOUNT_VARIABLE)):
        raise ConfigError(f"config key 'launch.account': not set, and ${ACCOUNT_VARIABLE} is empty; "
                          f"`export {ACCOUNT_VARIABLE}=<your project>` (the profiles read it too), or set "
                          "launch.account (false on a cluster without accounts)")
    qos, partition = launch.get("qos"), launch.get("partition") or ""
    limit = LEONARDO_QOS_MINUTES.get(qos or "normal") if partition.startswith("boost_") else None
    if limit is not None and launch["time_min"] > limit:
        raise ConfigError(f"config key 'launch.time_min': {launch['time_min']} min is longer than launch.qos "
                          f"{qos or 'normal'}'s limit of {limit} min on {partition}; lower launch.time_min "
                          f"(the job checkpoints and requeues before it) or choose another launch.qos")


def train_submission(launch: dict) -> str:
    """One line: what `train` submits (the -n table shows the resources of the rule that submits and waits)."""
    gpus, nodes = launch["gpus_per_node"], launch["nodes"]
    where = {"slurm": "one SLURM job", "local": "local processes", "inprocess": "the rule's own process"}
    parts = [f"rule train submits {where[launch['executor']]}: {nodes} node(s) x {gpus} GPU(s)"]
    if launch["executor"] == "slurm":
        parts.append(f"partition {launch.get('partition') or '(default)'}, qos {launch.get('qos') or '(default)'}, "
                     f"{launch['time_min']} min per job (checkpoint and requeue before it, up to "
                     f"{launch['max_requeues']} times), account {launch.get('account') or '(none)'}")
    return "; ".join(parts)
