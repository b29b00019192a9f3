"""The rerun policy: which config keys are each workflow step's params.

Snakemake reruns a job when its params change (and when its inputs or its shell text do), so the params
of a step must hold every key that changes its result and no other: a key in too many steps' params reruns
hours of GPU work for nothing, a key missing from a step's params leaves a stale result. The rules of
workflow/rules/*.smk take their params from these functions; tests/test_reruns.py says key by key which
steps each key reruns. Each function returns the text Snakemake compares (`config.dumps`: compact,
key-sorted JSON), so a finished run reruns nothing as long as that text stays the same.
"""

from __future__ import annotations

import re
import shlex

from brainddpm.config import (
    autoencoder_training,
    dumps,
    finetune_base_path,
    is_conditioned,
    is_latent,
    scheduler_section,
)

# The steps whose params are whole config sections: (sections, with the condition section of a conditional model)
STAGE_SECTIONS = {
    "manifest": (("datasets", "data"), True),
    "qc": (("datasets", "data"), False),
    "split": (("data", "seed"), True),
    "shard": (("data",), True),
    "train": (("run", "seed", "model", "scheduler", "train"), True),
}
# The evaluation steps: the keys of `evaluate` each one reads (with `seed`: evaluate.seed null means the global
# seed), so that e.g. evaluate.bootstrap reruns the resampling, not the features (a GPU job) or memorization
EVALUATION_KEYS = {
    "features": ("n", "seed", "msssim", "fid"),
    "bootstrap": ("bootstrap", "jobs", "seed"),
    "memorization": ("n", "seed", "memorization"),
    "realism_probe": ("n", "bootstrap", "seed", "realism"),
    "condition_check": ("bootstrap", "seed"),
    "reconstruction": ("bootstrap", "seed"),
}


def stage_params(cfg: dict, step: str) -> str:
    """The config sections `step` uses (STAGE_SECTIONS). A conditional model's steps also get the
    `condition` section, an unconditional run's do not: its params (and so its outputs) stay what they were
    before conditioning existed; likewise `model.kind` only for a latent model."""
    sections, condition = STAGE_SECTIONS[step]
    keys = list(sections) + (["condition"] if condition and is_conditioned(cfg) else [])
    chosen = {k: cfg[k] for k in keys}
    if "model" in chosen and not is_latent(cfg):
        chosen["model"] = {k: v for k, v in chosen["model"].items() if k != "kind"}
    if "scheduler" in chosen:  # a DDPM's: as before rectified flow existed
        chosen["scheduler"] = scheduler_section(chosen["scheduler"])
    if "data" in chosen and step != "qc":  # input QC's thresholds and policy are the qc step's alone
        chosen["data"] = {k: v for k, v in chosen["data"].items() if k != "qc"}
    if step == "train" and (base := finetune_base_path(cfg)) is not None:  # a run from scratch: as before
        chosen["finetune"] = {**cfg["finetune"], "init_from": str(base)}  # a run name as its file (no `results`)
    return dumps(chosen)


def preprocess_params(cfg: dict) -> str:
    """What preprocessing a raw head depends on: the preprocess section and the grid it writes onto."""
    return dumps({"preprocess": cfg["preprocess"], "data": {"grid": cfg["data"]["grid"]}})


def evaluation_params(cfg: dict, step: str) -> str:
    """The keys of `evaluate` that `step` reads (EVALUATION_KEYS), the global seed, and for `reconstruction`
    the decode section."""
    evaluate = {k: cfg["evaluate"][k] for k in EVALUATION_KEYS[step]}
    return dumps({"seed": cfg["seed"], "evaluate": evaluate, **({"decode": cfg["decode"]}
                                                                 if step == "reconstruction" else {})})


def autoencoder_params(cfg: dict) -> str:
    """What the autoencoder's training depends on: its section, and train.* with autoencoder.train over it;
    not use_checkpoint (memory, not results: the rule passes it as a resource, so it retrains nothing)."""
    merged = autoencoder_training(cfg)
    section = {k: v for k, v in cfg["autoencoder"].items() if k != "use_checkpoint"}
    return dumps({"run": cfg["run"], "seed": cfg["seed"], "autoencoder": section, "train": merged["train"]})


def sampler_params(cfg: dict, sampler: str) -> str:
    """The sample section as one sampler's parts see it: without the list of samplers and the other
    sampler's keys, so `sample.ddim_steps` reruns the DDIM parts only (not hours of DDPM parts); without the
    plan's keys (conditions, guidance_scale), which reach the parts through the plan file."""
    sample = {**cfg["sample"], "samplers": [sampler]}
    if sampler != "ddim":
        sample.pop("ddim_steps", None)
    if sampler != "rflow":
        sample.pop("rflow_steps", None)
    for key in ("conditions", "guidance_scale"):
        sample.pop(key, None)
    return dumps({"sample": sample, **({"decode": cfg["decode"]} if is_latent(cfg) else {})})


def utility_kind(cfg: dict) -> str:
    """categorical or continuous: utility.target_type, or (auto) the type of the target in condition.covariates."""
    utility = cfg["utility"]
    types = {c["name"]: c["type"] for c in cfg["condition"]["covariates"]}
    return types[utility["target"]] if utility["target_type"] == "auto" else utility["target_type"]


def utility_params(cfg: dict, step: str, arm: str | None = None) -> str:
    """The utility section as one step (part, two_sample, gather) sees it: only the keys that change that
    step's result, so that e.g. adding a ratio runs the new arm's parts only, and utility.bootstrap reruns
    the gather step only. target_type is resolved (auto: the covariate's type), as the list of arms was."""
    utility = {k: v for k, v in cfg["utility"].items() if k not in ("enabled", "sampler")}
    utility["target_type"] = utility_kind(cfg)
    if step == "part":
        utility = {k: v for k, v in utility.items() if k not in ("two_sample", "bootstrap", "confidence")}
        utility["ratios"] = [float(arm.removeprefix("mix-"))] if arm.startswith("mix-") else []
        if arm != "augmented":
            utility.pop("augment_ratio", None)
    elif step == "two_sample":
        utility = {k: utility[k] for k in ("cnn", "two_sample", "bootstrap", "confidence", "seed") if k in utility}
    return dumps(utility)


# ---- shell lines: their text is a rerun trigger too ("code" in Snakemake 9's --rerun-triggers) ----
PATH_FIELD = re.compile(r"\{((?:input|output|log|params)(?:\.\w+)?)\}")  # a path placeholder without a format


def quoted(template: str) -> str:
    """`template` with every path placeholder shell-quoted: {input} -> {input:q}, 2> {log} -> 2> {log:q}."""
    return PATH_FIELD.sub(r"{\1:q}", template)


def needs_quoting(cfg: dict) -> bool:
    """Whether a path of the config would need quotes in a shell line (a space, say: `results: my results`).
    Only then do the rules quote their paths: quoting a path that needs none prints the same command, but
    it changes the rule's shell text, which would rerun every finished job of a run made before."""
    paths = [cfg["results"], cfg["demo"]["out"], cfg["evaluate"]["fid"]["weights"], cfg["compare_with"],
             ((cfg.get("autoencoder") or {}).get("perceptual") or {}).get("cache_dir")]
    return any(shlex.quote(str(p)) != str(p) for p in paths if p)
