"""What the workflow checks before its first job, beyond the schema (config.validate_config): the site.

The schema checks a config's keys and values; these checks need the site the run starts on:
- input paths that must exist (the datasets' roots, globs and participants tables; the demo cohort's are
  written by its own rule, so they are not), and a `root` that holds BIDS images, not a flat folder;
- the SLURM account: `launch.account`, or by default the environment variable that the SLURM profiles read,
  so one setting serves both; a profile that still reads it unset is refused too;
- a LEONARDO QOS whose time limit is shorter than `launch.time_min`;
- a profile that submits to LEONARDO's Booster while training would run inside one of its jobs (the demo
  preset there: a CPU-only 24 h job for `train`, an A100 for each sampling part);
- training on this machine (launch.executor local or inprocess, no SLURM profile) with more GPUs than it has.
Each failure is a ConfigError naming the key and the path or value, raised in the workflow's startup
(`snakemake -n` included), before any job runs. `train_submission` says in one line what the `train` rule
(and `train_autoencoder`) will submit, since Snakemake's own table shows the resources of the local rule that
only submits and waits.

What the profile asks for is read from Snakemake's resource settings (`profile_resources`), the only part of
it that a Snakefile sees while Snakemake reads it: Snakemake 9 sets `workflow.executor_plugin` only when the
jobs are made, and in a dry run that plugin is the dry-run executor, whatever the profile's `executor:`.
The profile's SLURM resources (`slurm_partition`, `slurm_account`) say that it submits to SLURM.
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


def _check_bids_root(i: int, dataset: dict) -> None:
    """A `root` holds images where the manifest looks for them (sub-*/[ses-*/]anat/*_T1w.nii[.gz]); a folder of
    NIfTI files without that layout is what `glob` is for, so the error suggests the glob that would find them."""
    root = Path(dataset["root"])
    if next(glob.iglob(str(root / "sub-*" / "**" / "anat" / "*_T1w.nii*"), recursive=True), None):
        return
    flat = sorted(root.glob("*.nii*"))
    first = flat[0] if flat else next(root.glob("**/*.nii*"), None)  # the first only: a big tree is not walked
    where = (f"config key 'datasets[{i}].root' (dataset {dataset['name']}): {root} holds no BIDS images "
             "(sub-*/[ses-*/]anat/*_T1w.nii[.gz])")
    if first is None:
        raise ConfigError(f"{where}, and no NIfTI file at all")
    suffix = ".nii.gz" if first.name.endswith(".nii.gz") else ".nii"
    pattern = f"{root}/*{suffix}" if flat else f"{root}/**/*{suffix}"
    found = f"{len(flat)} NIfTI file(s) directly inside" if flat else f"NIfTI files below it ({first})"
    raise ConfigError(f"{where}, but {found}: for a folder of images, write glob: \"{pattern}\" instead of root: "
                      "(subject and session are then read from sub-/ses- in the file names)")


def check_datasets(cfg: dict) -> None:
    """Every dataset's root (a folder holding BIDS images), glob (matching at least one file) and participants
    table exist.

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
        if "root" in ds and not pending(ds["root"]):
            _check_bids_root(i, ds)
        if "glob" in ds and not pending(ds["glob"].split("*")[0] or ".") \
                and not any(Path(p).is_file() for p in glob.iglob(ds["glob"], recursive=True)):
            raise ConfigError(f"config key '{key}.glob': {ds['glob']} matches no file")
        table = ds.get("participants")
        if table and not pending(table) and not Path(table).is_file():
            raise ConfigError(f"config key '{key}.participants': {table} does not exist")
        where = ds.get("root") or ds["glob"].split("*")[0] or "."
        if not pending(where):
            _check_images(i, ds)


def _check_images(i: int, dataset: dict) -> None:
    """Discovery as the manifest will do it: the BIDS entity filters leave one image per subject and session
    (an error naming the files and the filter that chooses, never a silent pick), and every image has its
    brain mask when the dataset names a mask pattern (layout: fmriprep, or mask:), and its reference mask when
    it names one. A dataset to preprocess gets its masks from the preprocess rule."""
    from brainddpm.bids import discover, image_masks, reference_masks

    paths = discover(dataset, i)
    if not dataset.get("preprocess"):
        image_masks(dataset, paths, i)
    reference_masks(dataset, paths, i)


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


def profile_resources(resource_settings) -> dict[str, dict]:
    """What the profile (and the command line) asks of SLURM, as text: {rule, or "*" for default-resources:
    {resource: its expression}}, from Snakemake's resource settings (`workflow.resource_settings`: Resource
    objects carry the profile's text in `raw`; plain values pass as they are), with $VARs expanded as Snakemake
    expands them when it evaluates the resource for a job (an unset variable stays as it is)."""
    rules = {"*": resource_settings.default_resources or {}, **(resource_settings.overwrite_resources or {})}

    def text(value):
        raw = getattr(value, "raw", value)
        return os.path.expandvars(raw) if isinstance(raw, str) else raw

    return {rule: {name: text(value) for name, value in (resources or {}).items()} for rule, resources in rules.items()}


def submits_to_slurm(resources: dict[str, dict]) -> bool:
    """The profile submits its jobs to SLURM: it names a SLURM partition or account for some rule."""
    return any(name in ("slurm_partition", "slurm_account") for rule in resources.values() for name in rule)


def check_profile_account(resources: dict[str, dict]) -> None:
    """No job asks SLURM for the account `$BRAINDDPM_SLURM_ACCOUNT` itself: Snakemake leaves an unset variable
    in a profile as it is, and the jobs would carry that text as their account."""
    for rule, values in resources.items():
        value = values.get("slurm_account")
        if isinstance(value, str) and (f"${ACCOUNT_VARIABLE}" in value or not value.strip(" '\"")):
            where = "default-resources" if rule == "*" else f"set-resources: {rule}"
            raise ConfigError(f"profile key '{where}: slurm_account': ${ACCOUNT_VARIABLE} is not set, so every job "
                              f"would ask SLURM for the account {value!r}; `export {ACCOUNT_VARIABLE}=<your project>` "
                              "(on LEONARDO `saldo -b` lists yours) and start Snakemake again")


def booster_partition(resources: dict[str, dict]) -> str | None:
    """The LEONARDO Booster partition (boost_*) that the profile sends some rule to, if any."""
    for values in resources.values():
        partition = str(values.get("slurm_partition") or "").strip(" '\"")
        if partition.startswith("boost_"):
            return partition
    return None


def check_profile_fits(launch: dict, resources: dict[str, dict]) -> None:
    """On LEONARDO's Booster, training runs in its own submitit job (launch.executor: slurm). Any other executor
    would train inside the `train` rule's job, which the profile sizes as a waiting driver (no GPU, one core, a
    day), and a CPU-sized preset such as the demo would take an A100 for each sampling part."""
    partition = booster_partition(resources)
    if partition is None or launch["executor"] == "slurm":
        return
    runtime = resources.get("train", {}).get("runtime", "its")
    raise ConfigError(f"config key 'launch.executor': {launch['executor']} under a profile for LEONARDO's Booster "
                      f"({partition}): `train` would run inside a CPU-only SLURM job ({runtime} min, no GPU) and each "
                      "sample_part would hold an A100; run this config with --profile profiles/local (the demo: "
                      "make demo), or train on the Booster with launch.executor: slurm (README, \"Run on a cluster\")")


def check_training_gpus(launch: dict, visible: int | None = None) -> None:
    """Training on this machine (launch.executor local or inprocess) asks for no more GPUs than it has: said at
    startup, not hours later inside `train`. `visible`: the GPU count, by default this machine's."""
    gpus, executor = launch["gpus_per_node"], launch["executor"]
    if executor not in ("local", "inprocess") or not gpus:
        return
    if visible is None:
        from brainddpm.device import visible_gpus

        visible = visible_gpus()
    if gpus > visible:
        raise ConfigError(f"config key 'launch.gpus_per_node': {gpus} GPU(s) requested for training on this machine "
                          f"(launch.executor: {executor}), but it has {visible}; on a CPU layer config/cpu.yaml (your "
                          "data) or config/demo.yaml (the demo cohort) over config/config.yaml, or submit the "
                          "training to SLURM with launch.executor: slurm")


def check_site(cfg: dict, resources: dict[str, dict], main_process: bool = True, environ=os.environ) -> None:
    """Every check of this module, in the workflow's startup: `resources` is `profile_resources(...)` of the run;
    `main_process`: the Snakemake that plans the jobs (not one that runs a job of a cluster profile, where the
    GPUs of the node that runs `train` are SLURM's business)."""
    check_datasets(cfg)
    check_launch_site(cfg["launch"], environ)
    check_profile_fits(cfg["launch"], resources)
    check_profile_account(resources)
    if main_process and not submits_to_slurm(resources):
        check_training_gpus(cfg["launch"])


def train_submission(launch: dict, latent: bool = False) -> str:
    """One line: what `train` submits, and `train_autoencoder` the same job for latent diffusion (the -n table
    shows the resources of the rules that submit and wait)."""
    gpus, nodes = launch["gpus_per_node"], launch["nodes"]
    where = {"slurm": "one SLURM job", "local": "local processes", "inprocess": "the rule's own process"}
    rules = "rules train_autoencoder and train each submit" if latent else "rule train submits"
    parts = [f"{rules} {where[launch['executor']]}: {nodes} node(s) x {gpus} GPU(s)"]
    if launch["executor"] == "slurm":
        parts.append(f"partition {launch.get('partition') or '(default)'}, qos {launch.get('qos') or '(default)'}, "
                     f"{launch['time_min']} min per job (checkpoint and requeue before it, up to "
                     f"{launch['max_requeues']} times), account {launch.get('account') or '(none)'}")
    return "; ".join(parts)
