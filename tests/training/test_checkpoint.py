"""Checkpoints: atomic layout, keep-last, skipping damaged ones, refusing pickled objects."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

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


