"""Checkpoints: atomic layout, keep-last, skipping damaged ones, refusing pickled objects."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from brainddpm.errors import CheckpointError
from brainddpm.fileio import sha256_file
from brainddpm.training import checkpoint as ckpt

TINY = {"channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}


class NotATensor:
    """Stands for any object a checkpoint must not carry (its unpickling could run arbitrary code)."""

    def __init__(self):
        self.payload = "anything"


def _save(root, step, **kw):
    files = {"model.pt": {"model": {"w": torch.full((3,), float(step))}}, ckpt.rank_file("rng", 0): ckpt.rng_state()}
    return ckpt.save(root, step, files, {"note": "test"}, **kw)


def test_layout_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == "step-00000040"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "rng-rank00000.pt", "meta.json"}
    assert ckpt.read_meta(latest) == {"note": "test", "step": 40}
    assert ckpt.load_file(latest / "model.pt")["model"]["w"].tolist() == [40.0] * 3


def test_unfinished_and_truncated_checkpoints_are_skipped(tmp_path, caplog):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    # a run killed while writing step 30: the .tmp folder is never considered
    (tmp_path / "step-00000030.tmp").mkdir()
    (tmp_path / "step-00000030.tmp" / "model.pt").write_bytes(b"partial")
    # step 20 truncated afterwards (disk full, copy interrupted)
    model_file = tmp_path / "step-00000020" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="brainddpm.training.checkpoint"):
        latest = ckpt.find_latest(tmp_path)
    assert latest.name == "step-00000010"
    assert str(model_file) in caplog.text and "truncated" in caplog.text
    # a folder without its manifest (renamed by hand, or from another tool) is skipped too
    (tmp_path / "step-00000010" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="brainddpm.training.checkpoint"):
        assert ckpt.find_latest(tmp_path) is None
    assert "manifest.json is missing" in caplog.text


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = _save(tmp_path, 10)
    evil = path / "model.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "extra": NotATensor()}, evil)
    # even with a manifest that matches the altered file, loading refuses it
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.pt"] = {"bytes": evil.stat().st_size, "sha256": sha256_file(evil)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.find_latest(tmp_path) == path
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load.*pickled Python object \(.*NotATensor\)"):
        ckpt.load_file(evil)
    evil.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint file"):
        ckpt.load_file(evil)


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt.rng_state(gen), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_file(tmp_path / "rng.pt"), gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == expected


def test_optimizer_state_roundtrip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save(ckpt.optimizer_state(opt), tmp_path / "optimizer.pt")
    fresh = torch.optim.Adam(net.parameters(), lr=1e-2)
    ckpt.load_optimizer_state(fresh, ckpt.load_file(tmp_path / "optimizer.pt"))
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])




def test_checkpointer_restores_the_whole_state_and_leaves_the_fresh_one_untouched(tmp_path):
    """Save a state after a step, then restore it into a fresh one: every part comes back (network, EMA,
    generator, optimizer, bookkeeping), into a new state; the fresh state's EMA and generator are not changed."""
    from brainddpm.training.engine import RunPlan
    from brainddpm.training.runtime import Runtime
    from helpers import tiny_config

    cfg, runtime = tiny_config(), Runtime(0, 1, 0, torch.device("cpu"), owns_group=False)
    plan = RunPlan(1, 1, 1, steps_per_epoch=4, total_steps=8, bf16=False)

    def fresh() -> ckpt.TrainState:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        return ckpt.TrainState(net, {k: v.detach().clone() for k, v in net.state_dict().items()},
                               torch.Generator().manual_seed(7), torch.optim.Adam(net.parameters()))

    state = fresh()
    state.net(torch.rand(4, 3)).square().sum().backward()
    state.optimizer.step()
    state.ema = {k: v.detach().clone() + 1 for k, v in state.net.state_dict().items()}
    torch.rand(5, generator=state.generator)
    state.step, state.last_loss = 3, 0.25
    checkpointer = ckpt.Checkpointer(tmp_path, cfg, "diffusion", runtime, plan, "sha")
    checkpointer.save(state)
    meta = ckpt.read_meta(tmp_path / "step-00000003")
    assert meta["step"] == 3 and meta["final_loss"] == 0.25 and meta["epoch"] == 0.75 and meta["kind"] == "diffusion"

    start = fresh()
    ema_before, generator_before = {k: v.clone() for k, v in start.ema.items()}, start.generator.get_state()
    resumed = ckpt.Checkpointer(tmp_path, cfg, "diffusion", runtime, plan, "sha").restore(start)
    assert (resumed.step, resumed.resumed_from, resumed.last_loss) == (3, 3, 0.25)
    assert resumed.wall_before_s == meta["wall_time_s"]
    assert all(torch.equal(resumed.ema[k], state.ema[k]) for k in state.ema)
    assert torch.equal(resumed.generator.get_state(), state.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(resumed.net.parameters(), state.net.parameters()))
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"],
                       state.optimizer.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(start.ema[k], ema_before[k]) for k in ema_before)  # the fresh state's stay as they were
    assert torch.equal(start.generator.get_state(), generator_before)
    # no checkpoint: the state is used as it is; another training set: refused, naming what changed
    assert ckpt.Checkpointer(tmp_path / "none", cfg, "diffusion", runtime, plan, "sha").restore(start) is start
    with pytest.raises(CheckpointError, match="different the training shards"):
        ckpt.Checkpointer(tmp_path, cfg, "diffusion", runtime, plan, "other").restore(fresh())
