"""The training loop on CPU: the loss goes down, outputs are complete, resume is exact (DDP and DeepSpeed)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brainddpm.config import deep_merge
from brainddpm.data.nifti import grid_affine
from brainddpm.errors import CheckpointError
from brainddpm.models.diffusion import build_model, build_scheduler
from brainddpm.models.final import load_final
from brainddpm.training.engine import Engine, RunPlan, ema_decay_at
from brainddpm.training.loop import train
from brainddpm.training.objectives import DiffusionObjective
from brainddpm.training.runtime import scoped_environment, setup_runtime
from helpers import SHAPE, losses, make_shards, tiny_config


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


@pytest.mark.parametrize("backend,zero_stage,kind", [("ddp", 0, "ddpm"), ("deepspeed", 1, "ddpm"),
                                                     ("accelerate", 0, "ddpm"), ("ddp", 0, "rflow")])
def test_resume_is_exact(shards, tmp_path, caplog, backend, zero_stage, kind):
    environment = dict(os.environ)
    flow = {"scheduler": {"kind": kind}, "sample": {"samplers": ["rflow" if kind == "rflow" else "ddpm"]}}
    cfg = deep_merge(tiny_config(backend=backend, zero_stage=zero_stage, grad_accum=2, micro_batch=1), flow)
    straight = tmp_path / "straight"
    train(cfg, shards, straight)
    split = tmp_path / "split"
    train(deep_merge(tiny_config(backend=backend, zero_stage=zero_stage, grad_accum=2, micro_batch=1, max_steps=3),
                     flow), shards, split)
    resumed = train(cfg, shards, split)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert [s for s, _ in losses(split)] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in losses(split)], [v for _, v in losses(straight)], rtol=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # a damaged newest checkpoint is skipped with a message, and the run resumes from the one before
    damaged = split / "checkpoints" / "step-00000006" / "model.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="brainddpm.training.checkpoint"):
        again = train(cfg, shards, split)
    assert f"skipping checkpoint {damaged.parent}" in caplog.text and "truncated" in caplog.text
    assert again["resumed_from_step"] == 3
    c = load_file(split / "model.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert dict(os.environ) == environment  # the runs leave no rendezvous variables behind


def test_ema_warm_up_leaves_no_share_of_the_initialisation(shards, tmp_path):
    # the decay schedule: 0.1 after the first step, the configured decay once (1+t)/(10+t) exceeds it
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.9999) == 0.9999
    share = np.prod([ema_decay_at(t, 0.9999) for t in range(20000)])  # the 20k-step run
    assert share < 1e-3 < 0.9999 ** 20000  # without warm-up 13.5% of the random weights would remain
    # end to end, one step: EMA = (1 - 0.1) * weights after the step + 0.1 * initial weights
    cfg = tiny_config(max_steps=1, ema_decay=0.9999)
    train(cfg, shards, tmp_path)
    torch.manual_seed(cfg["seed"])
    initial = build_model(cfg["model"]).state_dict()
    stepped = torch.load(tmp_path / "checkpoints" / "step-00000001" / "model.pt", weights_only=True)["model"]
    exported = load_file(tmp_path / "model.safetensors")
    for k, v in exported.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * stepped[k] + 0.1 * initial[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["deepspeed", "accelerate", "ddp"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_engine_honours_the_precision(backend, precision):
    """bf16 means bf16 convolutions over fp32 weights, fp32 Adam state and an fp32 loss, for every backend.

    The DeepSpeed engine is inspected too: without its torch_autocast section it would switch an outer
    autocast off and train in fp32 while the log says bf16.
    """
    before = dict(os.environ)
    with scoped_environment():
        runtime = setup_runtime(backend, gpus_per_node=0)
        cfg = tiny_config(backend=backend, precision=precision)
        torch.manual_seed(0)
        net = build_model(cfg["model"]).train()
        plan = RunPlan(2, 1, 1, 1, 1, bf16=precision == "bf16")
        engine = Engine(cfg["train"], plan, runtime, net, DiffusionObjective(build_scheduler(cfg["scheduler"])))
        seen = []
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        loss = engine.micro_step(torch.rand(2, 1, *SHAPE), torch.Generator().manual_seed(0), boundary=True)
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen and set(seen) == {expected}
        assert loss.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in net.parameters())
        state = engine.optimizer.state_dict()["state"]
        assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
        if backend == "deepspeed":
            assert engine.model.torch_autocast_enabled() == (precision == "bf16")
            if precision == "bf16":
                assert engine.model.torch_autocast_dtype() == torch.bfloat16
        if backend == "accelerate":
            assert engine.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")
        engine.close()
    assert dict(os.environ) == before  # nothing leaks (Accelerate exports LOCAL_WORLD_SIZE and others)


def test_live_status_is_shown_while_waiting(shards, tmp_path, caplog):
    """The run writes its live status file (progress.json); the watcher of `brainddpm train` turns it into one
    line, in place on a terminal, as a log line elsewhere."""
    import io

    from brainddpm.training.launch import LiveStatusWatcher
    from brainddpm.training.losslog import LIVE_STATUS, format_duration

    train(tiny_config(max_steps=4), shards, tmp_path)
    state = json.loads((tmp_path / "checkpoints" / LIVE_STATUS).read_text())
    assert state["step"] == state["total_steps"] == 4 and state["samples_per_s"] > 0 and state["eta_s"] == 0

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    watcher = LiveStatusWatcher(tmp_path / "checkpoints" / LIVE_STATUS, stream=screen)
    line = watcher.poll()
    assert line.startswith("training: step 4/4 (epoch ") and "samples/s per process, ETA 0 s" in line
    assert watcher.poll() is None  # nothing new
    watcher.close()
    assert screen.getvalue() == "\r" + line.ljust(100) + "\n"
    assert LiveStatusWatcher(tmp_path / "missing.json").poll() is None
    with caplog.at_level(logging.INFO, logger="brainddpm.training.launch"):  # the rule's log, terminal or not
        LiveStatusWatcher(tmp_path / "checkpoints" / LIVE_STATUS, stream=io.StringIO()).poll()
    assert line in caplog.text
    assert [format_duration(s) for s in (None, 12.4, 425, 12000)] == ["?", "12 s", "7 min 5 s", "3 h 20 min"]
