"""GPU checks: run with `pytest -m gpu` on a machine with CUDA; everywhere else they skip with the reason.

NCCL in one process, one bf16 training step per backend (eager and compiled), save -> resume on the GPU
with the same next losses for every backend under the GPU default (`performance: auto`, compiled), and
sampling that is bit-for-bit the same for one and two jobs at the same batch size, compiled and eager; the
latent path (autoencoder with its adversarial loss, encoding, latent UNet, decoding) and the utility stage's
CNN on the GPU.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from brainddpm.config import deep_merge
from brainddpm.data.nifti import target_affine
from brainddpm.device import Performance, resolve_performance
from brainddpm.models.diffusion import build_model, build_scheduler
from brainddpm.models.final import save_final
from brainddpm.training.engine import Engine, RunPlan
from brainddpm.training.loop import train
from brainddpm.training.objectives import DiffusionObjective
from brainddpm.training.runtime import scoped_environment, setup_runtime
from helpers import SHAPE, base_config, losses, make_shards, sample_jobs, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on one)"),
]


def _gpu_config(**train_cfg) -> dict:
    return deep_merge(tiny_config(**train_cfg), {"launch": {"gpus_per_node": 1}})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "train")


def test_nccl_process_group_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with scoped_environment():
        runtime = setup_runtime("deepspeed", gpus_per_node=1)
        assert runtime.device.type == "cuda" and dist.get_backend() == "nccl"
        t = torch.ones(4, device=runtime.device)
        dist.all_reduce(t)
        assert t.sum().item() == 4


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate", "ddp"])
def test_one_bf16_step_per_backend(backend, compiled):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    with scoped_environment():
        runtime = setup_runtime(backend, gpus_per_node=1)
        cfg = _gpu_config(backend=backend, precision="bf16")
        torch.manual_seed(0)
        net = build_model(cfg["model"]).to(runtime.device).train()
        seen = []
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
        if not compiled:  # a hook inside a compiled graph says nothing about the kernels that run
            conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        engine = Engine(cfg["train"], RunPlan(2, 1, 1, 1, 1, bf16=True), runtime, net,
                        DiffusionObjective(build_scheduler(cfg["scheduler"])), Performance(compile=compiled))
        before = [p.detach().clone() for p in net.parameters()]
        x = torch.rand(2, 1, *SHAPE, device=runtime.device)
        loss = engine.micro_step(x, torch.Generator(device=runtime.device).manual_seed(0), boundary=True)
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert set(seen) == (set() if compiled else {torch.bfloat16})
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        engine.close()


@pytest.mark.parametrize("backend", ["deepspeed", "accelerate", "ddp"])
def test_resume_on_gpu_continues_with_the_same_losses(shards, tmp_path, backend):
    """Under the GPU default (performance: auto, so compiled): save -> resume gives the same next losses."""
    cfg = _gpu_config(backend=backend, max_steps=6)
    assert resolve_performance(cfg["performance"], torch.device("cuda")).compile
    torch.backends.cudnn.deterministic = True  # exactness up to cuDNN's autotuner is what training promises
    try:
        train(cfg, shards, tmp_path / "straight")
        train(_gpu_config(backend=backend, max_steps=3), shards, tmp_path / "split")
        resumed = train(cfg, shards, tmp_path / "split")
    finally:
        torch.backends.cudnn.deterministic = False
    assert resumed["resumed_from_step"] == 3 and resumed["device"] != "cpu"
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in split], [v for _, v in straight], rtol=2e-2)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


@pytest.mark.parametrize("compile_setting", ["auto", False], ids=["compiled", "eager"])
def test_sampling_is_bitwise_identical_for_one_and_two_jobs_on_gpu(tmp_path, compile_setting):
    cfg = base_config(scheduler={"num_train_timesteps": 20})
    torch.manual_seed(0)
    net = build_model(cfg["model"])
    ckpt = tmp_path / "model.safetensors"
    data = {"target_shape": cfg["data"]["target_shape"], "affine": target_affine(cfg["data"]).tolist(),
            "intensity_range": [0.0, 1.0]}
    save_final(ckpt, net.state_dict(), {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data}, step=1)
    performance = {"compile": compile_setting}
    a, _ = sample_jobs(cfg, ckpt, tmp_path, 1, device="cuda", performance=performance)
    b, _ = sample_jobs(cfg, ckpt, tmp_path, 2, device="cuda", performance=performance)
    np.testing.assert_array_equal(a, b)


def test_tutorial_baseline_and_levers_run_on_gpu():
    from brainddpm.bench.train import Levers, bench_baseline, bench_levers

    cfg, gpu = base_config(), torch.device("cuda")
    shape = tuple(cfg["data"]["target_shape"])
    b = bench_baseline(cfg, shape, 2, 2, gpu, warmup=1)
    assert b["autocast_dtype"] == "fp16" and np.isfinite(b["final_loss"]) and b["peak_memory_bytes"] > 0
    for levers in (Levers(), Levers(channels_last=True, fused_adam=True), Levers(checkpointing=True, flash=False)):
        r = bench_levers(cfg, shape, 2, 2, gpu, levers, warmup=1)
        assert np.isfinite(r["final_loss"]) and r["samples_per_s"] > 0


def test_latent_path_on_gpu(tmp_path):
    """The latent path's GPU side, never run on a GPU before: the autoencoder with its adversarial loss under
    the GPU default (bf16, compiled), encoding, a latent UNet and sampling that decodes, all on the GPU."""
    from helpers import latent_chain

    assert resolve_performance(tiny_config()["performance"], torch.device("cuda")).compile
    autoencoder, latent, part = latent_chain(tmp_path, gpus=1, backend="deepspeed", precision="bf16")
    for info in (autoencoder, latent):
        assert info["device"] != "cpu" and info["precision"] == "bf16" and np.isfinite(info["final_loss"]), info
    assert len(autoencoder["discriminator_sha256"]) == 1
    with h5py.File(part) as f:
        volumes = f["images"][()]
    assert volumes.shape == (2, 1, *SHAPE) and np.isfinite(volumes).all() and volumes.max() > 0


def test_utility_cnn_learns_on_gpu():
    """The utility stage's downstream CNN takes a free GPU: it learns bright against dark volumes there."""
    from brainddpm.utility.downstream import cnn_predictions, device

    assert device().type == "cuda"
    rng = np.random.default_rng(0)
    labels = np.arange(16) % 2
    images = (rng.uniform(0, 0.2, (16, 1, *SHAPE)) + 0.6 * labels[:, None, None, None, None]).astype(np.float32)
    cnn = {"channels": [4, 8], "strides": [2, 2], "steps": 40, "batch": 4, "lr": 1e-3}
    probabilities = cnn_predictions(images[:12], labels[:12], images[12:], True, 2, cnn, seed=0)
    assert probabilities.shape == (4, 2) and (probabilities.argmax(1) == labels[12:]).all()
