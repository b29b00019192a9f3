"""The engine's speed settings on the CPU: `performance` resolved per device, channels-last training that
computes what eager training computes, and a compilation failure that falls back to eager instead of
killing the run. (Their GPU figures are in docs/benchmarks.md; `pytest -m gpu` runs them compiled.)"""

from __future__ import annotations

import logging

import pytest
import torch

from brainddpm.config import performance_section, validate_config
from brainddpm.device import CUDA_DEFAULTS, EAGER, Performance, resolve_performance
from brainddpm.errors import ConfigError
from brainddpm.models.diffusion import build_model, build_scheduler
from brainddpm.training.engine import Engine, RunPlan
from brainddpm.training.objectives import DiffusionObjective
from brainddpm.training.runtime import scoped_environment, setup_runtime
from helpers import SHAPE, tiny_config


def test_auto_is_the_measured_gpu_default_and_off_on_cpus():
    assert resolve_performance({}, torch.device("cpu")) == EAGER
    gpu = resolve_performance({"compile": "auto"}, torch.device("cuda", 0))
    assert (gpu.compile, gpu.channels_last, gpu.low_precision_norm) == (
        CUDA_DEFAULTS["compile"], CUDA_DEFAULTS["channels_last"], CUDA_DEFAULTS["low_precision_norm"])
    assert resolve_performance({"compile": False}, torch.device("cuda", 0)).compile is False
    assert resolve_performance({"channels_last": True}, torch.device("cpu")).channels_last is True
    with pytest.raises(ConfigError, match="performance.compile_mode"):
        validate_config({"performance": {"compile_mode": "fastest"}}, partial=True)
    with pytest.raises(ConfigError, match="performance.compile"):
        validate_config({"performance": {"compile": "yes"}}, partial=True)
    zero = tiny_config(backend="deepspeed", zero_stage=1)
    with pytest.raises(ConfigError, match="performance.channels_last"):  # at startup, not in the job
        validate_config({**zero, "performance": {"channels_last": True}})
    validate_config({**zero, "performance": {"channels_last": "auto"}})


def test_legacy_train_compile_keeps_its_meaning():
    assert performance_section({"train": {"compile": True}}) == {}  # "compile on CUDA": what auto does
    assert performance_section({"train": {"compile": False}}) == {"compile": False}
    assert performance_section({"train": {"compile": False}, "performance": {"compile": True}}) == {"compile": True}
    assert performance_section({"train": {}}) == {}


def _losses(performance: Performance, steps: int = 3, backend: str = "ddp") -> tuple[list[float], torch.nn.Module]:
    cfg = tiny_config(backend=backend)
    with scoped_environment():
        runtime = setup_runtime(backend)
        torch.manual_seed(0)
        net = build_model(cfg["model"]).train()
        engine = Engine(cfg["train"], RunPlan(2, 1, 1, steps, steps, bf16=False), runtime, net,
                        DiffusionObjective(build_scheduler(cfg["scheduler"])), performance)
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
        losses = [float(engine.micro_step(x, generator, boundary=True)) for _ in range(steps)]
        engine.close()
    return losses, net


@pytest.mark.parametrize("backend", ["ddp", "deepspeed", "accelerate"])
def test_channels_last_trains_the_same_model(backend):
    eager, _ = _losses(EAGER, steps=4, backend=backend)
    cl, net_cl = _losses(Performance(channels_last=True), steps=4, backend=backend)
    assert eager == pytest.approx(cl, rel=1e-4)  # the same trajectory, up to float rounding
    conv = next(m for m in net_cl.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_compilation_failure_falls_back_to_eager(caplog):
    import torch._dynamo

    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("this backend cannot compile anything")

    eager, _ = _losses(EAGER, steps=2)
    with caplog.at_level(logging.INFO):
        compiled, _ = _losses(Performance(compile=True, compile_backend=broken_backend), steps=2)
    torch._dynamo.reset()
    assert calls, "the engine never tried to compile"
    assert not torch._dynamo.config.suppress_errors  # set around the engine's steps only
    assert compiled == pytest.approx(eager, rel=1e-6)
    assert "compiling the network" in caplog.text and "performance.compile: false" in caplog.text


def test_channels_last_is_refused_with_zero_partitioning():
    cfg = tiny_config(backend="deepspeed", zero_stage=1)
    with scoped_environment():
        runtime = setup_runtime("deepspeed")
        with pytest.raises(ConfigError, match="performance.channels_last"):
            Engine(cfg["train"], RunPlan(2, 1, 1, 1, 1, bf16=False), runtime, build_model(cfg["model"]),
                   DiffusionObjective(build_scheduler(cfg["scheduler"])), Performance(channels_last=True))
