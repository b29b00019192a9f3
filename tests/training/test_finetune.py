"""Fine-tuning (training/finetune.py): a run that starts from a base model's weights, with frozen parts, exact
resume, provenance, and refusals of a base that is another network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from brainddpm.config import deep_merge, finetune_base_path, validate_config
from brainddpm.data.dataset import ShardDataset
from brainddpm.errors import CheckpointError, ConfigError
from brainddpm.fileio import sha256_file
from brainddpm.models.diffusion import build_scheduler
from brainddpm.models.final import load_final, read_final, save_final
from brainddpm.training.checkpoint import load_file
from brainddpm.training.finetune import Base, check_base, read_base, start_from_base
from brainddpm.training.loop import train
from brainddpm.training.objectives import DiffusionObjective
from helpers import losses, make_shards, tiny_config

FROZEN = ["conv_in", "down_blocks"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A base model trained on one cohort, and the shards of another (the 'patients')."""
    root = tmp_path_factory.mktemp("finetune")
    train(tiny_config(max_steps=6), make_shards(root / "controls" / "train"), root / "base")
    return root / "base" / "model.safetensors", make_shards(root / "patients" / "train", n=6, seed=3)


def finetune_config(base_model: Path, freeze=FROZEN, **train_cfg) -> dict:
    return deep_merge(tiny_config(**{"max_steps": 4, "lr": 5e-3, **train_cfg}),
                      {"finetune": {"init_from": str(base_model), "freeze": list(freeze)}})


def first_batch_loss(model_path: Path, cfg: dict, shards: Path) -> float:
    """The loss the loop's first step computes, from the model file's weights: the same first batch (the
    sampler's order at epoch 0) and the same noise and timesteps (the run's generator)."""
    net, _ = load_final(model_path)
    dataset = ShardDataset(shards, verify=False, cache=True)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg["seed"], drop_last=True)
    sampler.set_epoch(0)
    x = torch.stack([dataset[i][0] for i in list(sampler)[:cfg["train"]["micro_batch"]]])
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000)
    objective = DiffusionObjective(build_scheduler(cfg["scheduler"]))
    with torch.no_grad():
        return float(objective(net.train(), x, None, generator, 0))


def test_finetuning_starts_from_the_base_freezes_what_it_is_told_and_resumes_exactly(base, tmp_path):
    base_model, patients = base
    cfg = finetune_config(base_model)
    tuned = train(cfg, patients, tmp_path / "tuned")
    # the first step's loss is the base's loss on that batch; a run from scratch starts elsewhere
    first = losses(tmp_path / "tuned")[0][1]
    assert np.isclose(first, first_batch_loss(base_model, cfg, patients), rtol=1e-5)
    scratch = train(tiny_config(max_steps=1), patients, tmp_path / "scratch")
    assert not np.isclose(scratch["final_loss"], first, rtol=1e-3)
    # frozen parameters are bit-identical to the base's after 4 steps, the others moved
    _, base_weights = read_final(base_model)
    weights = load_file(tmp_path / "tuned" / "checkpoints" / "step-00000004" / "model.pt")["model"]
    frozen = [k for k in weights if k.split(".")[0] in FROZEN]
    trained = [k for k in weights if k.split(".")[0] not in FROZEN and weights[k].is_floating_point()]
    assert frozen and all(torch.equal(weights[k], base_weights[k]) for k in frozen)
    assert sum(not torch.equal(weights[k], base_weights[k]) for k in trained) > len(trained) // 2
    # provenance: the final model and train.json name the base
    config, _ = read_final(tmp_path / "tuned" / "model.safetensors")
    assert config["base"] == {"path": str(base_model), "run": "base", "sha256": sha256_file(base_model), "step": 6}
    assert tuned["base"]["sha256"] == sha256_file(base_model) and tuned["frozen"]["prefixes"] == FROZEN
    assert tuned["frozen"]["parameters"] == sum(base_weights[k].numel() for k in frozen)
    # exact resume of a fine-tuning run (from a copy of the base, changed below)
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(base_model.read_bytes())
    train(finetune_config(copy, max_steps=2), patients, tmp_path / "split")
    resumed = train(finetune_config(copy), patients, tmp_path / "split")
    assert resumed["resumed_from_step"] == 2
    np.testing.assert_allclose([v for _, v in losses(tmp_path / "split")], [v for _, v in losses(tmp_path / "tuned")],
                               rtol=1e-6)
    # a base whose file changed since the checkpoints were written is refused on resume, naming it
    base_config, _ = read_final(base_model)
    save_final(copy, {k: v + 1e-3 for k, v in base_weights.items()},
               {k: base_config[k] for k in ("model", "scheduler", "data")}, 6)
    with pytest.raises(CheckpointError, match=r"different base model \(finetune.init_from: its file's sha256"):
        train(finetune_config(copy, max_steps=6), patients, tmp_path / "split")


def _base(config: dict, tmp_path: Path) -> Base:
    return Base(tmp_path / "b" / "model.safetensors", "0" * 64, config, {})


def test_a_base_of_another_network_is_refused_naming_both_sides(tmp_path):
    cfg = tiny_config()
    data = {"target_shape": [16, 16, 16]}
    same = {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data}
    check_base(_base(same, tmp_path), cfg, data)  # the same network: accepted
    wider = deep_merge(same, {"model": {"channels": [16, 16, 16]}})
    with pytest.raises(ConfigError, match=r"base has model.channels \[16, 16, 16\], this run \[8, 8, 8\]"):
        check_base(_base(wider, tmp_path), cfg, data)
    flow = deep_merge(same, {"scheduler": {"kind": "rflow"}})
    with pytest.raises(ConfigError, match="base has scheduler.kind 'rflow', this run 'ddpm'"):
        check_base(_base(flow, tmp_path), cfg, data)
    latent = {"latent_shape": [2, 4, 4, 4], "scale_factor": 1.5, "autoencoder_sha256": "a" * 64, **data}
    other_ae = deep_merge(same, {"data": {**latent, "autoencoder_sha256": "b" * 64}})
    with pytest.raises(ConfigError, match="another autoencoder .its autoencoder_sha256 'bbbb"):
        check_base(_base(other_ae, tmp_path), cfg, latent)
    conditional = {**same, "condition": {"covariates": [{"name": "age", "type": "continuous", "mean": 60.0,
                                                         "std": 8.0}]}}
    with pytest.raises(ConfigError, match=r"base is conditioned on \[\('age', 'continuous'\)\], this run on nothing"):
        check_base(_base(conditional, tmp_path), cfg, data)


def test_finetune_keys_are_checked_before_training(base, tmp_path):
    base_model, _ = base
    assert read_base(tiny_config()) is None
    cfg = tiny_config()
    assert finetune_base_path(deep_merge(cfg, {"finetune": {"init_from": "controls"}})) == \
        Path(cfg["results"]) / "train" / "controls" / "model.safetensors"
    with pytest.raises(ConfigError, match="'finetune.freeze' is set without 'finetune.init_from'"):
        validate_config(deep_merge(cfg, {"finetune": {"freeze": ["down_blocks"]}}))
    with pytest.raises(ConfigError, match="fine-tuning a latent model is not supported yet"):
        validate_config(deep_merge(cfg, {"finetune": {"init_from": "controls"}, "model": {"kind": "latent"}}))
    with pytest.raises(ConfigError, match="'finetune.init_from': .*nowhere.safetensors does not exist"):
        read_base(deep_merge(cfg, {"finetune": {"init_from": str(tmp_path / "nowhere.safetensors")}}))
    found = read_base(finetune_config(base_model))
    net, _ = load_final(base_model)
    with pytest.raises(ConfigError, match="'finetune.freeze': 'encoder' names no parameter .*down_blocks"):
        start_from_base(net, found, ["encoder"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        start_from_base(net, found, sorted({n.split(".")[0] for n, _ in net.named_parameters()}))
    json.dumps(found.provenance())  # plain data, as the final file's metadata needs
