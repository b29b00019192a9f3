"""The rerun policy, key by key: which steps' params change when one config key changes.

Every leaf key of a config that has every section (latent, conditional, utility enabled) is changed in
turn; the steps whose params text changes are exactly the ones RERUNS names for that key (the longest
prefix of the key that RERUNS lists). A step missing from a key's set would keep a stale result; a step
too many reruns it for nothing (a GPU job, for `features`).
"""

from __future__ import annotations

import copy

import pytest
import yaml

from brainddpm import reruns
from brainddpm.config import deep_merge, validate_config
from helpers import ROOT

ARMS = ("real", "synthetic", "mix-0.5", "augmented", "oversampled")
EVALUATION = ("features", "bootstrap", "memorization", "realism_probe", "condition_check", "reconstruction")


def _config() -> dict:
    cfg = {}
    for name in ("config.yaml", "demo.yaml", "demo-utility.yaml"):
        cfg = deep_merge(cfg, yaml.safe_load((ROOT / "config" / name).read_text()))
    cfg = validate_config(cfg)  # conditional (age, diagnosis) with utility enabled; then a latent model
    return deep_merge(cfg, {"model": {"kind": "latent"}, "sample": {"samplers": ["ddpm", "ddim"]}})


def steps(cfg: dict) -> dict[str, str]:
    """Every step's params text, as the rules compute it."""
    out = {step: reruns.stage_params(cfg, step) for step in reruns.STAGE_SECTIONS}
    out["preprocess"] = reruns.preprocess_params(cfg)
    out["train_autoencoder"] = reruns.autoencoder_params(cfg)
    out.update({f"sample_part:{s}": reruns.sampler_params(cfg, s) for s in ("ddpm", "ddim")})
    out.update({step: reruns.evaluation_params(cfg, step) for step in EVALUATION})
    out.update({f"utility_part:{arm}": reruns.utility_params(cfg, "part", arm) for arm in ARMS})
    out["two_sample"] = reruns.utility_params(cfg, "two_sample")
    out["utility_gather"] = reruns.utility_params(cfg, "gather")
    return out


SAMPLE_PARTS = {"sample_part:ddpm", "sample_part:ddim"}
PARTS = {f"utility_part:{arm}" for arm in ARMS}
TRAINING = {"train", "train_autoencoder"}
# key (or the longest listed prefix of it) -> the steps it reruns
RERUNS = {
    "results": set(), "compare_with": set(), "demo": set(),  # paths and the demo cohort's own rule
    "run": TRAINING,
    "seed": {"split", *TRAINING, *EVALUATION},
    "datasets": {"manifest", "qc"},
    "data": {"manifest", "qc", "split", "shard"},
    "data.qc": {"qc"},
    "data.grid": {"manifest", "qc", "split", "shard", "preprocess"},  # preprocessing writes onto the grid
    "preprocess": {"preprocess"},  # input QC's thresholds and policy: the qc step alone (split reads its decisions)
    "condition": {"manifest", "split", "shard", "train"},  # a conditional model's data stage and training
    "model": {"train"},
    "scheduler": {"train"},
    "scheduler.rflow": set(),  # a DDPM's: unused (a rectified-flow model's: train, test_rflow_keys_rerun_training)
    "train": TRAINING,  # the autoencoder's training takes train.* under autoencoder.train ...
    **{f"train.{key}": {"train"} for key in ("epochs", "micro_batch", "lr", "ema_decay")},  # ... which sets these
    "autoencoder": {"train_autoencoder"},
    "finetune.init_from": {"train"},  # the diffusion model's base (not the autoencoder's)
    "finetune.freeze": set(),  # without init_from: refused at startup (config.py; below: with it, train)
    "autoencoder.use_checkpoint": set(),  # memory, not results: a resource
    "decode": SAMPLE_PARTS | {"reconstruction"},
    "launch": set(), "performance": set(),  # where and how fast: resources and an environment variable
    "sample": SAMPLE_PARTS,
    "sample.samplers": set(),  # which samplers run: the jobs, not their params
    "sample.ddim_steps": {"sample_part:ddim"},
    "sample.rflow_steps": set(),  # the rflow sampler's alone (neither ddpm nor ddim: below)
    "sample.conditions": set(), "sample.guidance_scale": set(),  # condition_plan's own params (sample.smk)
    "evaluate.n": {"features", "memorization", "realism_probe"},
    "evaluate.seed": set(EVALUATION),
    "evaluate.bootstrap": {"bootstrap", "realism_probe", "condition_check", "reconstruction"},  # not features,
    # not memorization
    "evaluate.realism": {"realism_probe"},
    "evaluate.jobs": {"bootstrap"},
    "evaluate.msssim": {"features"},
    "evaluate.fid": {"features"},
    "evaluate.memorization": {"memorization"},
    "utility.enabled": set(), "utility.sampler": set(),  # whether the stage exists, whose parts it reads
    "utility": PARTS | {"utility_gather"},
    "utility.ratios": {"utility_gather"},  # a new ratio adds a mix arm; the others keep their params
    "utility.augment_ratio": {"utility_part:augmented", "utility_gather"},
    "utility.bootstrap": {"two_sample", "utility_gather"},
    "utility.confidence": {"two_sample", "utility_gather"},
    "utility.seed": PARTS | {"two_sample", "utility_gather"},
    "utility.cnn": PARTS | {"two_sample", "utility_gather"},
    "utility.two_sample": {"two_sample", "utility_gather"},
}


def _leaves(cfg: dict, prefix=()):
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, copy.deepcopy(value[-1])] if value else [1]
    return 1  # None, an empty mapping


def _expected(path: tuple) -> set[str]:
    for n in range(len(path), 0, -1):
        if ".".join(path[:n]) in RERUNS:
            return RERUNS[".".join(path[:n])]
    raise AssertionError(f"{'.'.join(path)}: no entry in RERUNS; say which steps it reruns")


BASE = _config()
BEFORE = steps(BASE)
LEAVES = [p for p in _leaves(BASE) if p != ("model", "kind")]  # kind changes the DAG itself (below)


@pytest.mark.parametrize("path", LEAVES, ids=[".".join(p) for p in LEAVES])
def test_each_key_reruns_exactly_its_steps(path):
    before = BEFORE
    cfg = copy.deepcopy(BASE)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "age" if path == ("utility", "target") else _changed(node[path[-1]])  # another covariate
    after = steps(cfg)
    assert {s for s in before if before[s] != after[s]} == _expected(path)


def test_an_unconditional_pixel_run_has_neither_condition_nor_kind_in_its_params():
    """Its params are what they were before conditioning and latent models existed."""
    cfg = validate_config(deep_merge(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()),
                                     yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())))
    train = yaml.safe_load(reruns.stage_params(cfg, "train"))
    assert set(train) == {"run", "seed", "model", "scheduler", "train"} and "kind" not in train["model"]
    assert "condition" not in yaml.safe_load(reruns.stage_params(cfg, "manifest"))
    assert reruns.evaluation_params(cfg, "bootstrap") == \
        '{"evaluate":{"bootstrap":500,"jobs":2,"seed":null},"seed":1234}'


def test_paths_are_quoted_only_where_a_path_needs_it():
    cfg = copy.deepcopy(BASE)
    assert not reruns.needs_quoting(cfg)
    assert reruns.quoted("x --out {output} --cfg {params.cfg:q} {input.real} 2> {log}") == \
        "x --out {output:q} --cfg {params.cfg:q} {input.real:q} 2> {log:q}"
    cfg["results"] = "/tmp/x/my results"
    assert reruns.needs_quoting(cfg)


def test_each_evaluation_steps_params_are_a_config_its_command_accepts():
    """A step's params are what its command reads (--config-json): the evaluate keys left out are not
    needed, and a section holding only some keys passes the partial validation."""
    import argparse

    from brainddpm.arguments import load_args_config

    for step in reruns.EVALUATION_KEYS:
        job = load_args_config(argparse.Namespace(config=None, config_json=reruns.evaluation_params(BASE, step)))
        defaulted = {"realism"}  # the schema's default fills it in (evaluate.realism: default {})
        assert set(job["evaluate"]) - defaulted == set(reruns.EVALUATION_KEYS[step]) - defaulted


def test_rflow_keys_rerun_training_and_the_rflow_parts_only():
    """Under scheduler.kind: rflow its options are the training's params, and sample.rflow_steps the rflow
    sampler's parts' (the rule of one sampler's keys, as ddim_steps)."""
    flow = deep_merge(BASE, {"scheduler": {"kind": "rflow"}, "sample": {"samplers": ["rflow"]}})
    changed = deep_merge(flow, {"scheduler": {"rflow": {"sample_method": "logit-normal"}}})
    assert reruns.stage_params(changed, "train") != reruns.stage_params(flow, "train")
    assert reruns.stage_params(flow, "train") != reruns.stage_params(BASE, "train")
    more = deep_merge(flow, {"sample": {"rflow_steps": 10}})
    assert reruns.sampler_params(more, "rflow") != reruns.sampler_params(flow, "rflow")
    assert reruns.sampler_params(more, "ddim") == reruns.sampler_params(flow, "ddim")


def test_finetune_keys_rerun_the_diffusion_training_only():
    """A fine-tuning run's base and frozen parts are its training's params; a run from scratch's params do not
    hold the section at all (they stay what they were before fine-tuning existed)."""
    pixel = deep_merge(BASE, {"model": {"kind": "pixel"}})  # a latent model is not fine-tuned yet
    tuned = deep_merge(pixel, {"finetune": {"init_from": "controls"}})
    frozen = deep_merge(tuned, {"finetune": {"freeze": ["down_blocks"]}})
    assert "finetune" not in yaml.safe_load(reruns.stage_params(pixel, "train"))
    assert len({reruns.stage_params(c, "train") for c in (pixel, tuned, frozen)}) == 3
    assert len({reruns.autoencoder_params(c) for c in (pixel, tuned, frozen)}) == 1
    # the job gets the base as a file (its config has no `results` to resolve a run name against)
    base = yaml.safe_load(reruns.stage_params(tuned, "train"))["finetune"]["init_from"]
    assert base == f"{BASE['results']}/train/controls/model.safetensors"
