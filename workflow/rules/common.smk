# Config validation, paths and targets. Logic lives in src/brainddpm.
import os
import shlex
import sys

from brainddpm import reruns
from brainddpm.config import is_conditioned, is_latent
from brainddpm.config import dumps, finetune_base_path, utility_enabled, validate_config
from brainddpm.bids import preprocess_jobs, preprocessed_paths
from brainddpm.errors import ConfigError
from brainddpm.startup import check_site, profile_resources, resolve_account, train_submission

try:  # before any job, `-n` included: the schema, then the site (paths, SLURM account and QOS, profile, GPUs)
    validate_config(config)
    config["launch"] = resolve_account(config["launch"])  # launch.account, else $BRAINDDPM_SLURM_ACCOUNT
    # what the profile asks of SLURM: the only part of it seen here (the executor is known once jobs are made)
    check_site(config, profile_resources(workflow.resource_settings), main_process=workflow.is_main_process)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")
if config["launch"]["executor"] == "slurm":
    print(train_submission(config["launch"], latent=is_latent(config)), file=sys.stderr)

# How fast the jobs run (compile, channels-last, bf16 GroupNorm), never what they compute: `brainddpm train`
# and `brainddpm sample` read it from this variable, which every job inherits (a SLURM job's Snakemake
# sets it again). Not a param and not in the shell commands, so changing it reruns nothing: params and
# the commands' text are both rerun triggers.
os.environ.update(BRAINDDPM_PERFORMANCE=dumps(config["performance"]))  # set here, read by jobs

R = config["results"]
RUN = config["run"]
DEMO_DIR = config["demo"]["out"]
CONDITIONED = is_conditioned(config)  # condition.covariates set: a conditional model (CFG)
LATENT = is_latent(config)  # model.kind: latent: autoencoder -> latent shards -> latent DDPM (latent.smk)
DEMO_PARTICIPANTS = f"{DEMO_DIR}/participants.tsv" if config["demo"]["enabled"] else []
UTILITY = utility_enabled(config)  # utility.enabled: the utility stage (utility.smk); off, nothing of it exists
# datasets with preprocess: true: one preprocess job per raw image (its MNI-space brain -> its raw input)
PREPROCESSED = f"{R}/preprocessed"
PREPROCESS_JOBS = preprocess_jobs(config["datasets"], PREPROCESSED)
QC = f"{R}/qc"
QC_EXCLUDES = config["data"]["qc"]["policy"] == "exclude"  # then the split reads qc.tsv; warn and fail do not


wildcard_constraints:
    split="train|val",
    i=r"\d{4}",
    part=r"\d{3}",
    k=r"\d{3}",
    sampler="ddpm|ddim|rflow",


# Paths in shell lines are quoted where a config path needs it (brainddpm.reruns.needs_quoting): only then, as
# the text of a shell line is a rerun trigger, and runs made before quoting existed must not rerun.
QUOTE_PATHS = reruns.needs_quoting(config)


def shell_line(template):
    return reruns.quoted(template) if QUOTE_PATHS else template


# The rules' params: which config keys rerun which step is decided in brainddpm.reruns (tests/test_reruns.py)
def stage_config(step):
    # a function, so that Snakemake does not read a dataset's "{subject}" (reference_mask) as a wildcard
    text = reruns.stage_params(config, step)
    return lambda wildcards: text


def preprocess_config():
    return reruns.preprocess_params(config)


def evaluation_config(step):
    return reruns.evaluation_params(config, step)


def autoencoder_config():
    return reruns.autoencoder_params(config)


def sampler_config(wildcards):
    return reruns.sampler_params(config, wildcards.sampler)


def shard_files(wildcards):
    """Shards of one split, known once the split checkpoint has run."""
    from brainddpm.data.prepare import n_shards

    splits = checkpoints.split.get().output.splits
    n = n_shards(splits, wildcards.split, config["data"]["volumes_per_shard"])
    return [f"{R}/shards/{wildcards.split}/shard-{i:04d}.h5" for i in range(n)]


def print_data_summary():
    from brainddpm.data.qc import console_summary

    shards = [f"{R}/shards/{split}/index.json" for split in ("train", "val")]
    for line in console_summary(f"{QC}/data_summary.json", shards):
        print(line, file=sys.stderr)


def prepare_targets():
    return expand(f"{R}/shards/{{split}}/index.json", split=["train", "val"]) + [f"{QC}/data_summary.json"]


# ---- paths of the later stages ----
AUTOENCODER_DIR = f"{R}/autoencoder/{RUN}"
AUTOENCODER = f"{AUTOENCODER_DIR}/autoencoder.safetensors" if LATENT else []
LATENTS = f"{R}/latents/{RUN}"
TRAIN_INDEX = f"{LATENTS}/train/index.json" if LATENT else f"{R}/shards/train/index.json"  # what `train` reads
TRAIN_DIR = f"{R}/train/{RUN}"
# the perceptual loss's network, fetched where there is internet (a login node); [] when unused
PERCEPTUAL = config["autoencoder"]["perceptual"]
PERCEPTUAL_READY = (
    f"{PERCEPTUAL['cache_dir']}/.brainddpm-{PERCEPTUAL['network']}" if LATENT and PERCEPTUAL["weight"] > 0 else []
)


def latent_files(wildcards):
    """Latent shards of one split (latent.smk): one per image shard, known once the split checkpoint has run."""
    return [f.replace(f"{R}/shards/", f"{LATENTS}/", 1) for f in shard_files(wildcards)]


MODEL = f"{TRAIN_DIR}/model.safetensors"
# a fine-tuning run's base model (finetune.init_from: training/finetune.py), an input of `train`; [] otherwise
FINETUNE_BASE = str(finetune_base_path(config) or "") or []


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
MASKED = config["sample"]["background"] == "mask"
MASK_RULE = f"{R}/samples/mask_rule.json" if MASKED else []  # sample.background: mask (chosen on the train split)
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


def realism_targets():
    return [f"{EVAL}/{s}/realism.json" for s in SAMPLERS]


def evaluate_targets():
    return (
        [f"{EVAL}/{s}/metrics.json" for s in SAMPLERS]
        + [f"{EVAL}/memorization.json"]
        + realism_targets()
        + conditioning_targets()
        + reconstruction_targets()
    )


def report_targets():
    return [f"{R}/report/report.md"]


# ---- utility stage (utility.enabled, utility.smk): does the synthetic data help? ----
UTILITY_DIR = f"{R}/utility/{RUN}"
UTILITY_JSON = f"{UTILITY_DIR}/utility.json"


def utility_kind():
    return reruns.utility_kind(config)


def utility_arms():
    from brainddpm.utility.arms import arm_names

    return arm_names(config["utility"]["ratios"], utility_kind() == "categorical")


def utility_sampler():
    return config["utility"]["sampler"] or SAMPLERS[0]


def utility_config(step, arm=None):
    return reruns.utility_params(config, step, arm)


def utility_parts():
    return [
        f"{UTILITY_DIR}/parts/{a}/repeat-{r}.json" for a in utility_arms() for r in range(config["utility"]["repeats"])
    ]


def two_sample_targets():
    return [f"{UTILITY_DIR}/two-sample/{s}.json" for s in SAMPLERS]


def utility_targets():
    return [UTILITY_JSON] if UTILITY else []


def all_targets():
    # latent diffusion: the validation split's latents too (the encoding stage writes both splits)
    return report_targets() + ([f"{LATENTS}/val/index.json"] if LATENT else []) + utility_targets()
