"""The training loop on CPU: the loss goes down, outputs are complete, resume is exact (DDP and DeepSpeed)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import base_config

from brainddpm.checkpoint import CheckpointError, load_final
from brainddpm.config import deep_merge
from brainddpm.nifti import grid_affine
from brainddpm.shards import write_index, write_shard
from brainddpm.train import train

SHAPE = (16, 16, 16)


def make_shards(split_dir: Path, n: int = 8, seed: int = 0) -> Path:
    """A training split of `n` ellipsoid 'brains' of 16^3 voxels in [0, 1], in one shard."""
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    vols = []
    for _ in range(n):
        r = sum(((idx[k] - 7.5) / rng.uniform(4, 7)) ** 2 for k in range(3))
        vols.append((r < 1) * rng.uniform(0.5, 1.0) * (0.8 + 0.2 * np.sin(idx[0] / 2)))
    summary = write_shard(split_dir / "shard-000.h5", np.stack(vols), [{"subject": f"s{i}"} for i in range(n)],
                          grid_affine(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), dtype="float32",
                          compression="none")
    write_index("train", [summary], split_dir / "index.json")
    return split_dir


def tiny_config(**train) -> dict:
    """Reference config with a tiny UNet, 16^3 volumes, one CPU process, no workers."""
    return base_config(
        data={"target_shape": list(SHAPE)},
        train={"max_steps": 6, "micro_batch": 2, "lr": 1e-3, "ema_decay": 0.9, "num_workers": 0,
               "cache_in_memory": True, "checkpoint_every": 3, "keep_last": 2, "log_every": 2,
               "backend": "ddp", "zero_stage": 0, **train},
        launch={"executor": "inprocess", "gpus_per_node": 0, "max_requeues": 2},
    )


def losses(out_dir: Path, live: bool = False) -> list[tuple[int, float]]:
    """Rows of loss.csv; `live`: the log that grows during training (checkpoints/loss.csv)."""
    path = out_dir / "checkpoints" / "loss.csv" if live else out_dir / "loss.csv"
    if live and not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "train")


def test_a_few_steps_reduce_the_loss(shards, tmp_path):
    result = train(tiny_config(max_steps=12), shards, tmp_path)
    curve = [loss for _, loss in losses(tmp_path)]
    assert len(curve) == 12
    assert np.mean(curve[-3:]) < 0.9 * np.mean(curve[:3]), curve
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "loss.csv", "loss.png", "train.json",
                                                     "checkpoints"}
    assert json.loads((tmp_path / "train.json").read_text()) == result
    assert result["steps"] == 12 and result["epochs"] == 3.0 and result["world_size"] == 1
    assert result["device"] == "cpu" and result["mfu"] is None and result["resumed_from_step"] is None
    assert result["samples_per_s"] > 0 and result["peak_memory_bytes"] > 0 and result["requeues"] == 0
    model, config = load_final(tmp_path / "model.safetensors")
    assert config["data"]["target_shape"] == list(SHAPE) and config["data"]["intensity_range"] == [0.0, 1.0]
    assert np.allclose(config["data"]["affine"], grid_affine(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert config["step"] == 12 and config["model"]["channels"] == [8, 8, 8]
    # resuming that run with another network, optimiser setting or training set is refused, naming the
    # checkpoint and what changed; a larger budget continues it, and the loss history survives the
    # deletion of loss.csv (Snakemake removes a rule's outputs before rerunning it)
    with pytest.raises(CheckpointError, match="step-00000012 was trained with a different model"):
        train(deep_merge(tiny_config(max_steps=14), {"model": {"channels": [16, 16, 16]}}), shards, tmp_path)
    with pytest.raises(CheckpointError, match="different train.lr"):
        train(deep_merge(tiny_config(max_steps=14), {"train": {"lr": 0.5}}), shards, tmp_path)
    other = make_shards(tmp_path / "other" / "train", seed=1)
    with pytest.raises(CheckpointError, match="training shards"):
        train(tiny_config(max_steps=14), other, tmp_path)
    (tmp_path / "loss.csv").unlink()
    more = train(tiny_config(max_steps=14), shards, tmp_path)
    assert more["resumed_from_step"] == 12 and [s for s, _ in losses(tmp_path)] == list(range(1, 15))


@pytest.mark.parametrize("backend,zero_stage", [("ddp", 0), ("deepspeed", 1)])
def test_resume_is_exact(shards, tmp_path, caplog, backend, zero_stage):
    cfg = tiny_config(backend=backend, zero_stage=zero_stage, grad_accum=2, micro_batch=1)
    straight = tmp_path / "straight"
    train(cfg, shards, straight)
    split = tmp_path / "split"
    train(tiny_config(backend=backend, zero_stage=zero_stage, grad_accum=2, micro_batch=1, max_steps=3),
          shards, split)
    resumed = train(cfg, shards, split)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert [s for s, _ in losses(split)] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in losses(split)], [v for _, v in losses(straight)], rtol=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # a damaged newest checkpoint is skipped with a message, and the run resumes from the one before
    damaged = split / "checkpoints" / "step-00000006" / "model.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="brainddpm.checkpoint"):
        again = train(cfg, shards, split)
    assert f"skipping checkpoint {damaged.parent}" in caplog.text and "truncated" in caplog.text
    assert again["resumed_from_step"] == 3
    c = load_file(split / "model.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
