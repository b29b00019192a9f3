"""Load, merge and validate the workflow configuration.

The schema (schemas/config.schema.yaml) checks keys and types; `validate_config` adds the checks
that need several keys at once (shapes that the UNet cannot take, MS-SSIM windows that do not fit).
Every error names the offending key, e.g. ``config key 'model.channels': ...``.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

from brainddpm.errors import ConfigError

SCHEMA_PATH = files("brainddpm") / "schemas" / "config.schema.yaml"


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (the way Snakemake merges --configfile)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path) -> dict:
    """One YAML/JSON config file as a mapping, or a ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return data


def load_config(paths) -> dict:
    """Read and merge YAML/JSON config files in order, then validate the result."""
    cfg: dict = {}
    for path in paths:
        cfg = deep_merge(cfg, read_config_file(path))
    return validate_config(cfg)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


@functools.cache
def schema() -> dict:
    """The config schema, read once per process (treat it as read-only)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _filling_defaults(validator_class):
    """A validator class that fills in each missing key's `default:` where its mapping is given (the
    jsonschema FAQ's recipe): the schema is the one place of the config's defaults."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, subschema):
        if validator.is_type(instance, "object"):
            for name, rule in properties.items():
                if "default" in rule and name not in instance:
                    instance[name] = copy.deepcopy(rule["default"])
        yield from check_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_then_check})


@functools.cache
def _validator():
    return _filling_defaults(jsonschema.Draft202012Validator)(schema())


_VALIDATED: set[str] = set()  # the configs this process has validated (as compact JSON): never checked twice


def _fingerprint(cfg: dict, partial: bool) -> str:
    return ("partial:" if partial else "full:") + json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)


def validate_config(cfg: dict, partial: bool = False) -> dict:
    """Validate `cfg` against the schema and the cross-key rules, filling in the schema's defaults; return it.

    With `partial`, top-level sections may be missing and a section may hold only some of its keys (a
    workflow step gets only what it uses: its params, brainddpm.reruns); the keys present are checked in
    full, and cross-key rules whose keys are present. A config this process validated before (the same
    content) is returned as it is: the checks run once per process.
    """
    if _fingerprint(cfg, partial) in _VALIDATED or (partial and _fingerprint(cfg, False) in _VALIDATED):
        return cfg
    errors = [e for e in _validator().iter_errors(cfg)
              if not (partial and e.validator == "required" and len(e.path) <= 1)]
    errors.sort(key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        if err.validator == "additionalProperties":
            known = set(err.schema.get("properties", {}))
            unknown = sorted(set(err.instance) - known)
            key = _key(list(err.path) + [unknown[0]]) if unknown else _key(err.path)
            raise ConfigError(f"config key '{key}': unknown key (known here: {', '.join(sorted(known))})")
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            raise ConfigError(f"config key '{_key(list(err.path) + [missing])}': missing")
        raise ConfigError(f"config key '{_key(err.path)}': {err.message}")
    _check_consistency(cfg)
    _VALIDATED.add(_fingerprint(cfg, partial))
    return cfg


def _check_consistency(cfg: dict) -> None:
    if "model" in cfg:
        _check_model(cfg["model"])
    _check_finetune(cfg)
    if is_latent(cfg):
        _check_latent(cfg)
    elif {"model", "data"} <= set(cfg):
        _check_shape(cfg["model"], cfg["data"])
    if "intensity" in cfg.get("data", {}):  # partial: a step may get data.grid alone (preprocess)
        lo, hi = cfg["data"]["intensity"]["lower_percentile"], cfg["data"]["intensity"]["upper_percentile"]
        if lo >= hi:
            raise ConfigError("config key 'data.intensity.upper_percentile': must be above lower_percentile")
    if "scheduler" in cfg and cfg["scheduler"]["beta_start"] >= cfg["scheduler"]["beta_end"]:
        raise ConfigError("config key 'scheduler.beta_end': must be above scheduler.beta_start")
    if {"data", "evaluate"} <= set(cfg) and "msssim" in cfg["evaluate"]:
        _check_msssim(cfg["evaluate"]["msssim"], cfg["data"]["target_shape"])
    if "sample" in cfg:
        _check_sample(cfg["sample"])
    if {"sample", "scheduler"} <= set(cfg):
        _check_samplers(cfg["sample"]["samplers"], scheduler_kind(cfg["scheduler"]))
    if "condition" in cfg:
        _check_condition(cfg["condition"], cfg.get("sample"))
    if utility_enabled(cfg):
        _check_utility(cfg)
    if {"train", "launch"} <= set(cfg):
        _check_launch(cfg["train"], cfg["launch"])
    if {"train", "performance"} <= set(cfg):
        check_channels_last(cfg["train"], cfg["performance"].get("channels_last") is True)
    if {"jobs", "bootstrap"} <= set(cfg.get("evaluate", {})) and cfg["evaluate"]["jobs"] > cfg["evaluate"]["bootstrap"]:
        raise ConfigError("config key 'evaluate.jobs': more jobs than bootstrap resamples")
    names = [d["name"] for d in cfg.get("datasets", [])]
    if len(names) != len(set(names)):
        raise ConfigError(f"config key 'datasets': dataset names must be unique, got {names}")
    if "datasets" in cfg and not cfg["datasets"]:
        demo = cfg.get("demo") or {}
        hint = (f"the demo cohort is written to {demo['out']}, but no dataset lists it (see config/demo.yaml)"
                if demo.get("enabled") else "list your datasets or enable the demo cohort")
        raise ConfigError(f"config key 'datasets': empty; {hint}")


# the samplers a model of each scheduler kind takes (the run's config at startup, a model file's when sampling)
SAMPLERS_OF = {"ddpm": ("ddpm", "ddim"), "rflow": ("rflow",)}


def scheduler_kind(scheduler: dict) -> str:
    """ddpm or rflow: `scheduler.kind` (models saved before it existed are ddpm)."""
    return scheduler.get("kind", "ddpm")


def scheduler_section(scheduler: dict) -> dict:
    """The scheduler section as a DDPM run's params and checkpoints compare it: without `kind: ddpm` and the
    unused `rflow` options, as before rectified flow existed (so an upgrade reruns and refuses nothing)."""
    if scheduler_kind(scheduler) != "ddpm":
        return scheduler
    return {k: v for k, v in scheduler.items() if k not in ("kind", "rflow")}


def _check_samplers(samplers: list[str], kind: str) -> None:
    """rflow samples a rectified-flow model only; ddpm and ddim a DDPM-trained one only."""
    wrong = [s for s in samplers if s not in SAMPLERS_OF[kind]]
    if wrong:
        raise ConfigError(f"config key 'sample.samplers': {', '.join(wrong)} cannot sample a model trained with "
                          f"scheduler.kind: {kind}; its samplers: {', '.join(SAMPLERS_OF[kind])}")


def _check_model(model: dict) -> None:
    channels, levels = model["channels"], len(model["channels"])
    if len(model["attention_levels"]) != levels:
        raise ConfigError(
            f"config key 'model.attention_levels': has {len(model['attention_levels'])} entries, "
            f"model.channels has {levels}"
        )
    for c in channels:
        if c % model["norm_num_groups"]:
            raise ConfigError(
                f"config key 'model.channels': {c} channels are not divisible by "
                f"model.norm_num_groups={model['norm_num_groups']}"
            )
    # MONAI's middle block always attends over the last level's channels
    for c, att in zip(channels, model["attention_levels"][:-1] + [True]):
        if att and c % model["num_head_channels"]:
            raise ConfigError(
                f"config key 'model.num_head_channels': {model['num_head_channels']} does not divide the "
                f"{c} channels of an attention level"
            )


def tasks_per_node(launch: dict) -> int:
    """Training processes per node: launch.tasks_per_node, else one per GPU, else one."""
    return launch["tasks_per_node"] or launch["gpus_per_node"] or 1


def _check_launch(train: dict, launch: dict) -> None:
    if train["backend"] == "ddp" and train["zero_stage"]:
        raise ConfigError("config key 'train.zero_stage': ZeRO needs train.backend: deepspeed")
    gpus, tasks = launch["gpus_per_node"], tasks_per_node(launch)
    if gpus and tasks != gpus:
        raise ConfigError(f"config key 'launch.tasks_per_node': {tasks} processes for {gpus} GPUs per node; "
                          "training runs one process per GPU (leave it null)")
    if launch["executor"] == "inprocess" and (launch["nodes"] > 1 or tasks > 1):
        raise ConfigError("config key 'launch.executor': inprocess runs a single process; use local or slurm for "
                          f"{launch['nodes']} node(s) x {tasks} process(es)")
    if launch["executor"] == "local" and launch["nodes"] > 1:
        raise ConfigError("config key 'launch.nodes': the local executor runs on this machine only (set 1)")


def check_channels_last(train: dict, channels_last: bool) -> None:
    """DeepSpeed ZeRO-1/2 flattens the weights into one contiguous buffer: no channels-last weights there."""
    if channels_last and train["backend"] == "deepspeed" and train["zero_stage"] > 0:
        raise ConfigError("config key 'performance.channels_last': DeepSpeed ZeRO-1/2 flattens the weights into "
                          "one contiguous buffer; use it with train.zero_stage: 0 or another backend")


def _check_shape(model: dict, data: dict) -> None:
    levels = len(model["channels"])
    factor = 2 ** (levels - 1)
    if any(s % factor for s in data["target_shape"]):
        raise ConfigError(
            f"config key 'data.target_shape': {data['target_shape']} must be divisible by "
            f"2^(levels-1) = {factor} for a UNet with {levels} levels"
        )


def _check_latent(cfg: dict) -> None:
    """model.kind: latent: the autoencoder section fits itself, the data and the latent UNet."""
    for section in ("autoencoder", "decode"):
        if section not in cfg and {"data", "train"} <= set(cfg):  # a whole config, not a job's sections
            raise ConfigError(f"config key '{section}': missing (model.kind: latent needs it; see config/latent.yaml)")
    ae = cfg.get("autoencoder")
    if ae is None:
        return
    levels, factor = len(ae["channels"]), 2 ** (len(ae["channels"]) - 1)
    if len(ae["attention_levels"]) != levels:
        raise ConfigError(f"config key 'autoencoder.attention_levels': has {len(ae['attention_levels'])} entries, "
                          f"autoencoder.channels has {levels}")
    if any(c % ae["norm_num_groups"] for c in ae["channels"]):
        raise ConfigError(f"config key 'autoencoder.channels': {ae['channels']} are not all divisible by "
                          f"autoencoder.norm_num_groups={ae['norm_num_groups']}")
    if ae["pad_multiple"] % factor:
        raise ConfigError(f"config key 'autoencoder.pad_multiple': {ae['pad_multiple']} is not a multiple of the "
                          f"compression factor {factor} (2^(levels-1) for {levels} channel levels)")
    if ae["patch"] and any(p % factor for p in ae["patch"]):
        raise ConfigError(f"config key 'autoencoder.patch': {ae['patch']} must be divisible by the compression factor "
                          f"{factor}")
    train_keys = schema()["properties"]["train"]["properties"]
    unknown = sorted(set(ae["train"]) - set(train_keys))
    if unknown:
        raise ConfigError(f"config key 'autoencoder.train.{unknown[0]}': unknown key (it overrides train.*)")
    if "train" in cfg:
        try:
            validate_config({"train": {**cfg["train"], **ae["train"]}}, partial=True)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("config key 'train.", "config key 'autoencoder.train.")) from None
    if {"model", "data"} <= set(cfg):
        unet = 2 ** (len(cfg["model"]["channels"]) - 1)
        latent = [-(-s // ae["pad_multiple"]) * ae["pad_multiple"] // factor for s in cfg["data"]["target_shape"]]
        if any(s % unet for s in latent):
            raise ConfigError(f"config key 'autoencoder.pad_multiple': volumes of data.target_shape "
                              f"{cfg['data']['target_shape']} padded to a multiple of {ae['pad_multiple']} give "
                              f"latents of {latent}, which the latent UNet ({len(cfg['model']['channels'])} levels) "
                              f"cannot take: they must be divisible by {unet}; set pad_multiple to a multiple of "
                              f"{factor * unet}")


def msssim_min_size(kernel_size: int, scales: int) -> int:
    """Smallest edge length MONAI's MS-SSIM accepts for this kernel and number of scales.

    Both MONAI's size check (edge // (scales-1)² >= kernel) and the valid convolution at the
    coarsest scale (edge // 2^(scales-1) >= kernel) must hold. Lives here (not in evaluation/metrics.py) so that
    validating a config, which Snakemake does in every job, never imports torch or MONAI.
    """
    return kernel_size * max(1, (scales - 1) ** 2, 2 ** (scales - 1))


def _check_msssim(ms: dict, target_shape) -> None:
    need = msssim_min_size(ms["kernel_size"], ms["scales"])
    if any(s < need for s in target_shape):
        raise ConfigError(
            f"config key 'evaluate.msssim': kernel_size={ms['kernel_size']} with {ms['scales']} scales needs "
            f"every side of the target shape {target_shape} to be at least {need}"
        )


def _check_sample(smp: dict) -> None:
    if "ddim" in smp["samplers"] and "ddim_steps" not in smp:
        raise ConfigError("config key 'sample.ddim_steps': missing (the ddim sampler needs it)")
    n_batches = -(-smp["n"] // smp["batch"])
    if smp["jobs"] > n_batches:
        raise ConfigError(f"config key 'sample.jobs': {smp['jobs']} jobs but only {n_batches} batches of "
                          f"sample.batch={smp['batch']} in sample.n={smp['n']} (each job takes whole batches)")


def _check_condition(cond: dict, smp: dict | None) -> None:
    names = [c["name"] for c in cond["covariates"]]
    if len(names) != len(set(names)):
        raise ConfigError(f"config key 'condition.covariates': covariate names must be unique, got {names}")
    if not names or smp is None or not isinstance(smp.get("conditions"), list):
        return
    total = sum(s["n"] for s in smp["conditions"])
    if total != smp["n"]:
        raise ConfigError(f"config key 'sample.n': {smp['n']}, but the strata of sample.conditions ask for {total} "
                          "volumes (set sample.n to their sum)")
    kinds = {c["name"]: c["type"] for c in cond["covariates"]}
    for i, stratum in enumerate(smp["conditions"]):
        for key, value in stratum.items():
            if key == "n":
                continue
            if key not in kinds:
                raise ConfigError(f"config key 'sample.conditions[{i}].{key}': not a covariate of condition.covariates "
                                  f"({', '.join(names)})")
            numeric = isinstance(value, list) or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if kinds[key] == "continuous" and not numeric:
                raise ConfigError(f"config key 'sample.conditions[{i}].{key}': {value!r} is not a number or "
                                  "[low, high]")
            if isinstance(value, list) and (kinds[key] != "continuous" or value[0] > value[1]):
                raise ConfigError(f"config key 'sample.conditions[{i}].{key}': a range [low, high] needs a continuous "
                                  "covariate and low <= high")


def _check_utility(cfg: dict) -> None:
    """utility.enabled: the target is a covariate the model is conditioned on (a synthetic volume's label is the
    covariate it was asked for), and the plan does not copy the test set's covariates (no leakage)."""
    util = cfg["utility"]
    target = util.get("target")
    if not target:
        raise ConfigError("config key 'utility.target': required with utility.enabled (the covariate the downstream "
                          "models predict, e.g. diagnosis)")
    if "condition" in cfg or "sample" in cfg:  # a whole config (a job's sections may lack these)
        kinds = {c["name"]: c["type"] for c in (cfg.get("condition") or {}).get("covariates", [])}
        if target not in kinds:
            raise ConfigError(f"config key 'utility.target': {target!r} is not a covariate of condition.covariates "
                              f"({', '.join(kinds) or 'none: an unconditional model'}); the synthetic volumes' labels "
                              "are the covariates they were asked for, so the model must be conditioned on the target")
        kind = util["target_type"]
        if kind not in ("auto", kinds[target]):
            raise ConfigError(f"config key 'utility.target_type': {kind}, but condition.covariates has {target!r} as "
                              f"{kinds[target]}")
    smp = cfg.get("sample")
    if smp is not None:
        if smp["conditions"] == "match_validation":
            raise ConfigError("config key 'sample.conditions': match_validation copies the covariates of the "
                              "validation split, which is the utility stage's test set; with utility.enabled use "
                              "match_training or explicit strata")
        sampler = util.get("sampler")
        if sampler is not None and sampler not in smp["samplers"]:
            raise ConfigError(f"config key 'utility.sampler': {sampler} is not in sample.samplers {smp['samplers']}")
    cnn = util.get("cnn") or {}
    if "channels" in cnn and "strides" in cnn and len(cnn["channels"]) != len(cnn["strides"]):
        raise ConfigError(f"config key 'utility.cnn.strides': {len(cnn['strides'])} entries, utility.cnn.channels "
                          f"has {len(cnn['channels'])}")


def utility_enabled(cfg: dict) -> bool:
    return bool((cfg.get("utility") or {}).get("enabled"))


def split_seed(cfg: dict) -> int:
    s = cfg["data"]["split_seed"]
    return cfg["seed"] if s is None else s


def eval_seed(cfg: dict) -> int:
    s = cfg["evaluate"]["seed"]
    return cfg["seed"] if s is None else s


def dumps(cfg: dict) -> str:
    """Compact, key-sorted JSON: what rules pass to the command line (and what Snakemake compares)."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def covariate_names(cond_cfg: dict | None) -> list[str]:
    return [c["name"] for c in (cond_cfg or {}).get("covariates", [])]


def is_conditioned(cfg: dict) -> bool:
    """True when the config asks for a conditional model (`condition.covariates` not empty)."""
    return bool(covariate_names(cfg.get("condition")))


def performance_section(cfg: dict) -> dict:
    """The `performance` section (absent: every key auto), with the legacy `train.compile` of configs written
    before the section existed, where the section leaves `compile` auto: `true` meant "compile on CUDA",
    which is what auto does; `false` turns compiling off."""
    section = dict(cfg.get("performance") or {})
    legacy = (cfg.get("train") or {}).get("compile")
    if legacy is False and section.get("compile", "auto") == "auto":
        section["compile"] = False
    return section


def _check_finetune(cfg: dict) -> None:
    """finetune.freeze needs a base; a latent model cannot be fine-tuned yet (training/finetune.py)."""
    finetune = cfg.get("finetune") or {}
    if finetune.get("freeze") and not finetune.get("init_from"):
        raise ConfigError("config key 'finetune.freeze' is set without 'finetune.init_from': freezing randomly "
                          "initialised weights trains nothing useful")
    if finetune.get("init_from") and is_latent(cfg):
        raise ConfigError("config key 'finetune.init_from': fine-tuning a latent model is not supported yet (the "
                          "run would train its own autoencoder, whose latents the base never saw); fine-tune a "
                          "pixel model, or train the latent model from scratch")


def finetune_base_path(cfg: dict) -> Path | None:
    """`finetune.init_from` as a file (training/finetune.py), None for a run from scratch: a run name is that
    run's model in this results folder, anything with a slash or ending in .safetensors a path."""
    init_from = (cfg.get("finetune") or {}).get("init_from")
    if not init_from:
        return None
    init_from = str(init_from)
    if "/" in init_from or init_from.endswith(".safetensors"):
        return Path(init_from)
    return Path(cfg["results"]) / "train" / init_from / "model.safetensors"


def is_latent(cfg: dict) -> bool:
    """True when the config asks for latent diffusion (`model.kind: latent`)."""
    return (cfg.get("model") or {}).get("kind", "pixel") == "latent"


def autoencoder_training(cfg: dict) -> dict:
    """The config as the autoencoder's training run sees it: `train` with `autoencoder.train` laid over it."""
    overrides = (cfg.get("autoencoder") or {}).get("train") or {}
    return {**cfg, "train": {**cfg["train"], **overrides}}
