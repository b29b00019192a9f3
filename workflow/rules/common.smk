# Config validation, paths and targets. Logic lives in src/brainddpm.
import os

import sys

from brainddpm.config import autoencoder_training, is_conditioned, is_latent
from brainddpm.config import dumps, utility_enabled, validate_config
from brainddpm.errors import ConfigError
from brainddpm.startup import check_datasets, check_launch_site, resolve_account, train_submission

try:  # before any job, `-n` included: the schema, then the site (paths, SLURM account, QOS)
    validate_config(config)
    config["launch"] = resolve_account(config["launch"])  # launch.account, else $BRAINDDPM_SLURM_ACCOUNT
    check_datasets(config)
    check_launch_site(config["launch"])
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")
if config["launch"]["executor"] == "slurm":
    print(train_submission(config["launch"]), file=sys.stderr)

# How fast the jobs run (compile, channels-last, bf16 GroupNorm), never what they compute: `brainddpm train`
# and `brainddpm sample` read it from this variable, which every job inherits (a SLURM job's Snakemake
# sets it again). Not a param and not in the shell commands, so changing it reruns nothing: params and
# the commands' text are both rerun triggers.
os.environ.update(BRAINDDPM_PERFORMANCE=dumps(config.get("performance") or {}))  # set here, read by jobs

R = config["results"]
RUN = config["run"]
DEMO_DIR = config["demo"]["out"]
CONDITIONED = is_conditioned(config)  # condition.covariates set: a conditional model (CFG)
LATENT = is_latent(config)  # model.kind: latent: autoencoder -> latent shards -> latent DDPM (latent.smk)
DEMO_PARTICIPANTS = f"{DEMO_DIR}/participants.tsv" if config["demo"]["enabled"] else []
UTILITY = utility_enabled(config)  # utility.enabled: the utility stage (utility.smk); off, nothing of it exists


wildcard_constraints:
    split="train|val",
    i=r"\d{4}",
    part=r"\d{3}",
    k=r"\d{3}",
    sampler="ddpm|ddim",


def stage_config(*sections, condition=False):
    """JSON of the config sections a step uses: rules rerun when (only) these change. With `condition`,
    the `condition` section too, but only for a conditional model: an unconditional run's params (and so
    its outputs) stay exactly what they were before conditioning existed."""
    keys = list(sections) + (["condition"] if condition and CONDITIONED else [])
    cfg = {k: config[k] for k in keys}
    if "model" in cfg and not LATENT:  # model.kind: pixel (the default) leaves a pixel run's params as they were
        cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "kind"}
    return dumps(cfg)


def autoencoder_config():
    """What the autoencoder's training depends on: its section, and train.* with autoencoder.train over it;
    not use_checkpoint (memory, not results: the rule passes it as a resource, so it retrains nothing)."""
    merged = autoencoder_training(config)
    section = {k: v for k, v in config["autoencoder"].items() if k != "use_checkpoint"}
    return dumps({"run": RUN, "seed": config["seed"], "autoencoder": section, "train": merged["train"]})


def sampler_config(wildcards):
    """The sample section as one sampler's jobs see it: without the list of samplers and the other
    sampler's keys, so `sample.ddim_steps` reruns the DDIM parts only (not hours of DDPM parts)."""
    sample = {**config["sample"], "samplers": [wildcards.sampler]}
    if wildcards.sampler != "ddim":
        sample.pop("ddim_steps", None)
    for key in ("conditions", "guidance_scale"):  # the plan's keys (condition_plan): they reach the parts through it
        sample.pop(key, None)
    return dumps({"sample": sample, **({"decode": config["decode"]} if LATENT else {})})


def shard_files(wildcards):
    """Shards of one split, known once the split checkpoint has run."""
    from brainddpm.data.prepare import n_shards

    splits = checkpoints.split.get().output.splits
    n = n_shards(splits, wildcards.split, config["data"]["volumes_per_shard"])
    return [f"{R}/shards/{wildcards.split}/shard-{i:04d}.h5" for i in range(n)]


def prepare_targets():
    return expand(f"{R}/shards/{{split}}/index.json", split=["train", "val"])




# ---- paths of the later stages ----
AUTOENCODER_DIR = f"{R}/autoencoder/{RUN}"
AUTOENCODER = f"{AUTOENCODER_DIR}/autoencoder.safetensors" if LATENT else []
LATENTS = f"{R}/latents/{RUN}"
TRAIN_INDEX = f"{LATENTS}/train/index.json" if LATENT else f"{R}/shards/train/index.json"  # what `train` reads
TRAIN_DIR = f"{R}/train/{RUN}"
# the perceptual loss's network, fetched where there is internet (a login node); [] when unused
PERCEPTUAL = config.get("autoencoder", {}).get("perceptual", {"weight": 0})
PERCEPTUAL_READY = (f"{PERCEPTUAL['cache_dir']}/.brainddpm-{PERCEPTUAL['network']}"
                    if LATENT and PERCEPTUAL["weight"] > 0 else [])


def latent_files(wildcards):
    """Latent shards of one split (latent.smk): one per image shard, known once the split checkpoint has run."""
    return [f.replace(f"{R}/shards/", f"{LATENTS}/", 1) for f in shard_files(wildcards)]


MODEL = f"{TRAIN_DIR}/model.safetensors"


def training_threads(wildcards):
    """The training rules' threads. Run by Snakemake on this machine with launch.executor inprocess or local,
    the training processes take every core they may use on CPUs (training/runtime.py), so the rules declare
    them: Snakemake, which caps a rule's threads at --cores, then runs nothing beside them. (Beside them, a
    1-thread job slowed the demo's training 8x: OpenMP threads waiting for a core.) One thread where the rules
    only submit and watch a job (executor slurm), and under a cluster executor, whose profile sizes the job
    (threads would become its --cpus-per-task, uncapped). A function: Snakemake knows its executor only once
    the jobs are made, not while it reads this file."""
    if config["launch"]["executor"] == "slurm" or workflow.non_local_exec:
        return 1
    return len(os.sched_getaffinity(0))


SAMPLES = f"{R}/samples/{RUN}"
EVAL = f"{R}/eval/{RUN}"
SAMPLERS = config["sample"]["samplers"]
PLAN = f"{SAMPLES}/conditions.json" if CONDITIONED else []  # requested covariates per synthetic volume
FID_WEIGHTS = config["evaluate"]["fid"]["weights"] or []


def sample_parts(sampler):
    return [f"{SAMPLES}/{sampler}/part-{j:03d}.h5" for j in range(config["sample"]["jobs"])]


def bootstrap_chunks(sampler):
    return [f"{EVAL}/{sampler}/boot/chunk-{k:03d}.npz" for k in range(config["evaluate"]["jobs"])]


def sample_targets():
    return [p for s in SAMPLERS for p in sample_parts(s)]


def conditioning_targets():
    return [f"{EVAL}/{s}/conditioning.json" for s in SAMPLERS] if CONDITIONED else []


def reconstruction_targets():
    return [f"{EVAL}/reconstruction.json"] if LATENT else []


def evaluate_targets():
    return ([f"{EVAL}/{s}/metrics.json" for s in SAMPLERS] + [f"{EVAL}/memorization.json"] + conditioning_targets()
            + reconstruction_targets())


def report_targets():
    return [f"{R}/report/report.md"]


# ---- utility stage (utility.enabled, utility.smk): does the synthetic data help? ----
UTILITY_DIR = f"{R}/utility/{RUN}"
UTILITY_JSON = f"{UTILITY_DIR}/utility.json"


def utility_kind():
    """categorical or continuous: utility.target_type, or (auto) the type of the target in condition.covariates."""
    u = config["utility"]
    types = {c["name"]: c["type"] for c in config["condition"]["covariates"]}
    return types[u["target"]] if u.get("target_type", "auto") == "auto" else u["target_type"]


def utility_arms():
    from brainddpm.utility.arms import arm_names

    return arm_names(config["utility"].get("ratios", [0.5, 1.0, 2.0]), utility_kind() == "categorical")


def utility_sampler():
    return config["utility"].get("sampler") or SAMPLERS[0]


def utility_config(step, arm=None):
    """JSON of the utility section as one step sees it: only the keys that change that step's result, so that
    e.g. adding a ratio runs the new arm's parts only, and utility.bootstrap reruns the gather step only.
    target_type is resolved (auto: the covariate's type), as the list of arms was."""
    u = {k: v for k, v in config["utility"].items() if k not in ("enabled", "sampler")}
    u["target_type"] = utility_kind()
    if step == "part":
        u = {k: v for k, v in u.items() if k not in ("two_sample", "bootstrap", "confidence")}
        u["ratios"] = [float(arm.removeprefix("mix-"))] if arm.startswith("mix-") else []
        if arm != "augmented":
            u.pop("augment_ratio", None)
    elif step == "two_sample":
        u = {k: u[k] for k in ("cnn", "two_sample", "bootstrap", "confidence", "seed") if k in u}
    return dumps(u)


def utility_parts():
    return [f"{UTILITY_DIR}/parts/{a}/repeat-{r}.json" for a in utility_arms()
            for r in range(config["utility"].get("repeats", 5))]


def two_sample_targets():
    return [f"{UTILITY_DIR}/two-sample/{s}.json" for s in SAMPLERS]


def utility_targets():
    return [UTILITY_JSON] if UTILITY else []


def all_targets():
    # latent diffusion: the validation split's latents too (the encoding stage writes both splits)
    return report_targets() + ([f"{LATENTS}/val/index.json"] if LATENT else []) + utility_targets()
