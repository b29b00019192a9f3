"""The per-process runtime: no silent CPU fall-back, GPU claims for concurrent jobs, the preemption flag."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from brainddpm.errors import ConfigError
from brainddpm.training.runtime import StopSignal, require_cuda, scoped_environment, setup_runtime

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


@no_cuda
def test_gpus_requested_without_cuda_is_an_error_naming_the_cause(monkeypatch):
    require_cuda(0)  # CPU training on purpose is fine
    with pytest.raises(ConfigError, match=r"'launch.gpus_per_node': 4 GPU\(s\) per node requested, but .*CPU-only"):
        require_cuda(4)
    monkeypatch.setattr(torch.version, "cuda", "12.6")  # a CUDA build that sees no GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='' hides every GPU"):
        require_cuda(1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match="driver may be older"):
        require_cuda(1)
    with pytest.raises(ConfigError, match="launch.gpus_per_node"), scoped_environment():
        setup_runtime("ddp", gpus_per_node=1)  # the runtime checks before anything else


def test_one_process_runtime_leaves_the_environment_as_it_was(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = dict(os.environ)
    with scoped_environment():
        runtime = setup_runtime("ddp", gpus_per_node=0)
        assert (runtime.rank, runtime.world_size, runtime.device.type, runtime.owns_group) == (0, 1, "cpu", False)
        assert os.environ["WORLD_SIZE"] == "1"
        os.environ["LOCAL_WORLD_SIZE"] = "1"  # what Accelerate exports on CPUs
        os.environ["OMP_NUM_THREADS"] = "1"
    assert dict(os.environ) == before


def test_stop_signal_sets_a_flag_and_hands_over_to_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *a: seen.append("previous"))
    try:
        stop = StopSignal()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.flag and not seen
        assert stop.hand_over() and seen == ["previous"]
    finally:
        signal.signal(signal.SIGUSR2, previous)
