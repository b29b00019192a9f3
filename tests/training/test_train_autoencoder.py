"""The autoencoder trains through the same loop and engine (training/tasks.py, objectives.py): it learns, it
resumes exactly (discriminator included), and its file carries the latent scale factor."""

from __future__ import annotations

import pytest
import torch

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.models.autoencoder import build_autoencoder, encode_volumes, load_autoencoder
from brainddpm.models.final import read_final
from brainddpm.training.checkpoint import load_file
from brainddpm.training.loop import train
from helpers import autoencoder_config, make_shards


def _l1(autoencoder, ae_cfg, volumes) -> float:
    x = torch.from_numpy(volumes)
    with torch.no_grad():
        return float((autoencoder.reconstruct(x) - x).abs().mean())


def test_autoencoder_learns_to_reconstruct(tmp_path):
    shards = make_shards(tmp_path / "shards", n=8)
    cfg = autoencoder_config(train={"max_steps": 60, "lr": 3e-3, "ema_decay": 0.9, "checkpoint_every": 60})
    torch.manual_seed(cfg["seed"])
    untrained = build_autoencoder(cfg["autoencoder"]).eval()
    info = train(cfg, shards, tmp_path / "ae", kind="autoencoder")
    assert info["steps"] == 60 and info["kind"] == "autoencoder"
    trained, _ = load_autoencoder(tmp_path / "ae" / "autoencoder.safetensors")
    volumes, _, _ = read_volumes(split_files(shards))
    before, after = _l1(untrained, cfg["autoencoder"], volumes), _l1(trained, cfg["autoencoder"], volumes)
    # stated fraction: after 60 steps the mean absolute error is under 40 % of the untrained network's
    assert after < 0.4 * before, (before, after)


def test_scale_factor_is_one_over_the_std_of_the_training_latents(tmp_path):
    shards = make_shards(tmp_path / "shards", n=6)
    cfg = autoencoder_config(train={"max_steps": 3})
    train(cfg, shards, tmp_path / "ae", kind="autoencoder")
    autoencoder, config = load_autoencoder(tmp_path / "ae" / "autoencoder.safetensors")
    volumes, _, _ = read_volumes(split_files(shards))
    z = torch.cat([encode_volumes(autoencoder, torch.from_numpy(v[None]), cfg["autoencoder"]) for v in volumes])
    assert config["scale_factor"] == pytest.approx(1.0 / float(z.double().std(unbiased=False)), rel=1e-5)
    assert config["data"]["target_shape"] == [16, 16, 16]


@pytest.mark.parametrize("adversarial", [0.0, 0.1])
def test_autoencoder_resume_is_exact(tmp_path, adversarial):
    """Stopping after 3 steps and resuming gives bit-for-bit the weights of 6 uninterrupted steps (with the
    discriminator: its weights and Adam state are checkpointed and restored too)."""
    shards = make_shards(tmp_path / "shards", n=8)
    patch = {"patch": [12, 12, 12]}  # random patches: their corners come from the checkpointed generator
    overrides = {"adversarial": {"weight": adversarial, "start_step": 1}, **patch}
    straight = autoencoder_config(train={"max_steps": 6, "checkpoint_every": 3}, **overrides)
    train(straight, shards, tmp_path / "straight", kind="autoencoder")
    first = autoencoder_config(train={"max_steps": 3, "checkpoint_every": 3}, **overrides)
    train(first, shards, tmp_path / "resumed", kind="autoencoder")
    info = train(straight, shards, tmp_path / "resumed", kind="autoencoder")
    assert info["resumed_from_step"] == 3
    _, a = read_final(tmp_path / "straight" / "autoencoder.safetensors")
    _, b = read_final(tmp_path / "resumed" / "autoencoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if adversarial:
        d1 = load_file(tmp_path / "straight" / "checkpoints" / "step-00000006" / "discriminator.pt")
        d2 = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000006" / "discriminator.pt")
        assert all(torch.equal(v, d2["model"][k]) for k, v in d1["model"].items())
        start = load_file(tmp_path / "straight" / "checkpoints" / "step-00000003" / "discriminator.pt")
        assert any(not torch.equal(v, d1["model"][k]) for k, v in start["model"].items())  # it did train


def test_resume_refuses_another_autoencoder(tmp_path):
    from brainddpm.errors import CheckpointError

    shards = make_shards(tmp_path / "shards", n=8)
    train(autoencoder_config(train={"max_steps": 3}), shards, tmp_path / "ae", kind="autoencoder")
    other = autoencoder_config(train={"max_steps": 6}, latent_channels=3)
    with pytest.raises(CheckpointError, match="different autoencoder"):
        train(other, shards, tmp_path / "ae", kind="autoencoder")


def test_patch_larger_than_the_volumes_is_a_config_error(tmp_path):
    from brainddpm.errors import ConfigError

    shards = make_shards(tmp_path / "shards", n=4)
    with pytest.raises(ConfigError, match="autoencoder.patch"):
        train(autoencoder_config(train={"max_steps": 1}, patch=[32, 8, 8]), shards, tmp_path / "ae", kind="autoencoder")


def test_latent_model_needs_latent_shards(tmp_path):
    from brainddpm.errors import BadInputError
    from helpers import tiny_config

    shards = make_shards(tmp_path / "shards", n=4)
    cfg = tiny_config()
    cfg["model"] = {**cfg["model"], "kind": "latent"}
    with pytest.raises(BadInputError, match="model.kind"):
        train(cfg, shards, tmp_path / "run")


def test_discriminator_takes_a_bf16_reconstruction():
    """DeepSpeed autocasts inside its own forward only: the reconstruction reaches the adversarial term in bf16
    while the discriminator's weights are fp32."""
    from brainddpm.training.objectives import Discriminator

    cfg = autoencoder_config()
    disc = Discriminator({**cfg["autoencoder"]["adversarial"], "weight": 0.1}, cfg["train"], torch.device("cpu"),
                         bf16=True, accumulation=1, world_size=1)
    fake = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    loss = disc.generator_loss(fake.to(torch.bfloat16))
    loss.backward()
    assert torch.isfinite(loss) and fake.grad is not None
    assert all(p.grad is None for p in disc.net.parameters())  # the generator's term trains no discriminator
    before = [p.detach().clone() for p in disc.net.parameters()]
    disc.micro_step(torch.rand(2, 1, 16, 16, 16), fake.detach().to(torch.bfloat16), boundary=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, disc.net.parameters()))


@pytest.mark.slow  # about 40 s on 2 cores: two process starts (torch, MONAI, DeepSpeed)
def test_two_processes_train_one_autoencoder_and_one_discriminator(tmp_path):
    """2 gloo processes with the adversarial loss on: each rank sees other volumes, so the two discriminators
    stay one only through the engine's broadcast and gradient all-reduce; both nets end identical on every
    rank, and the discriminator did train. (The discriminator is plain torch beside any backend: one backend
    suffices; without the all-reduce this test fails.)"""
    from brainddpm.training.launch import submit_training, wait_training

    shards = make_shards(tmp_path / "shards", n=8)
    cfg = autoencoder_config(train={"backend": "deepspeed", "zero_stage": 1, "micro_batch": 1, "grad_accum": 2,
                                    "max_steps": 4, "checkpoint_every": 2},
                             adversarial={"weight": 0.1, "start_step": 1})
    cfg["launch"] = {**cfg["launch"], "executor": "local", "tasks_per_node": 2, "time_min": 10}
    result = wait_training(submit_training(cfg, shards, tmp_path / "ae", kind="autoencoder"))
    assert result["world_size"] == 2 and result["steps"] == 4 and result["kind"] == "autoencoder"
    assert len(result["weights_sha256"]) == 2 and len(set(result["weights_sha256"])) == 1
    assert len(result["discriminator_sha256"]) == 2 and len(set(result["discriminator_sha256"])) == 1
    first = load_file(tmp_path / "ae" / "checkpoints" / "step-00000002" / "discriminator.pt")["model"]
    last = load_file(tmp_path / "ae" / "checkpoints" / "step-00000004" / "discriminator.pt")["model"]
    assert any(not torch.equal(v, last[k]) for k, v in first.items())  # it trained after the checkpoint at step 2
