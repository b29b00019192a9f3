"""The MONAI network and schedulers built from the config."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from brainddpm.bench.train import bench_train
from brainddpm.config import validate_config
from brainddpm.errors import ConfigError
from brainddpm.models.diffusion import build_ddim, build_model, build_scheduler, diffusion_loss
from helpers import base_config

TINY = {"channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}
SCHED = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0005, "beta_end": 0.0195,
         "prediction_type": "epsilon"}


@pytest.mark.parametrize("flash", [False, True])
def test_unet_maps_a_volume_to_a_volume(flash):
    net = build_model({**TINY, "use_flash_attention": flash})
    assert isinstance(net, DiffusionModelUNet)
    assert net.block_out_channels == [8, 8, 8] and list(net.attention_levels) == [False, False, True]
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(x, timesteps=torch.tensor([0, 999]))
    assert out.shape == x.shape


def test_middle_block_head_channels_are_checked():
    # attention only at no level, but the middle block still attends over channels[-1] = 12
    with pytest.raises(ConfigError, match="model.num_head_channels"):
        validate_config({"model": {**TINY, "channels": [8, 8, 12], "attention_levels": [False] * 3,
                                   "norm_num_groups": 4}}, partial=True)


def test_schedulers_share_the_configured_betas():
    ddpm = build_scheduler(SCHED)
    assert isinstance(ddpm, DDPMScheduler) and ddpm.num_train_timesteps == 1000
    expected = torch.linspace(0.0005 ** 0.5, 0.0195 ** 0.5, 1000) ** 2
    assert torch.allclose(ddpm.betas, expected)
    ddim = build_ddim(SCHED, steps=50)
    assert isinstance(ddim, DDIMScheduler) and len(ddim.timesteps) == 50
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    cosine = build_scheduler({**SCHED, "schedule": "cosine"})  # takes no beta range
    assert cosine.betas.shape == (1000,)


def test_loss_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    net, sched = build_model(TINY), build_scheduler(SCHED)
    x = torch.rand(2, 1, 16, 16, 16)
    a = diffusion_loss(net, sched, x, torch.Generator().manual_seed(1))
    b = diffusion_loss(net, sched, x, torch.Generator().manual_seed(1))
    assert a.ndim == 0 and a.item() == b.item() and a.item() > 0


@pytest.mark.parametrize("backend", ["deepspeed", "accelerate", "ddp"])
def test_bench_train_goes_through_the_training_engine(backend):
    cfg = base_config(model=TINY, train={"backend": backend}, launch={"gpus_per_node": 0})
    r = bench_train(cfg, (16, 16, 16), batch=2, steps=2, warmup=1)
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["mfu"] is None and r["backend"] == backend
    assert r["samples_per_s"] == pytest.approx(2 * r["steps_per_s"]) and r["samples_per_s"] > 0
    assert r["flops_per_sample"] > 0 and r["peak_memory_bytes"] > 0


@pytest.mark.parametrize("adversarial", [0.0, 0.1])
def test_bench_train_times_the_autoencoder_with_its_own_objective(adversarial):
    """kind="autoencoder" times the network the autoencoder's training run builds (not the UNet), on
    volumes padded to pad_multiple, with the discriminator when its weight is on, and really steps it."""
    from brainddpm.config import deep_merge
    from brainddpm.models.autoencoder import build_autoencoder, build_discriminator
    from helpers import TINY_AUTOENCODER

    ae = deep_merge(TINY_AUTOENCODER, {"pad_multiple": 8, "use_checkpoint": True,
                                       "adversarial": {"weight": adversarial, "start_step": 0},
                                       "train": {"lr": 1e-3}})
    cfg = base_config(model=TINY, launch={"gpus_per_node": 0}, autoencoder=ae)
    r = bench_train(cfg, (12, 16, 12), batch=1, steps=2, warmup=1, kind="autoencoder", ema=True)
    assert r["kind"] == "autoencoder" and r["channels"] == 1
    assert r["parameters"] == sum(p.numel() for p in build_autoencoder(ae).parameters())
    expected = sum(p.numel() for p in build_discriminator(ae["adversarial"]).parameters()) if adversarial else 0
    assert r["discriminator_parameters"] == expected
    assert torch.isfinite(torch.tensor(r["final_loss"])) and r["final_loss"] > 0
    assert r["weight_checksum_change"] != 0.0  # the optimizer stepped the autoencoder's weights
    assert r["flops_per_sample"] > 0 and r["samples_per_s"] > 0


def test_bench_train_times_a_latent_unet_on_latent_channels():
    cfg = base_config(model=TINY, launch={"gpus_per_node": 0})
    r = bench_train(cfg, (8, 8, 8), batch=2, steps=1, warmup=1, channels=3)
    assert r["kind"] == "diffusion" and r["channels"] == 3
    assert r["parameters"] == sum(p.numel() for p in build_model(TINY, channels=3).parameters())
    assert r["flops_per_sample"] > 0 and r["weight_checksum_change"] != 0.0
    with pytest.raises(ValueError, match="kind"):
        bench_train(cfg, (8, 8, 8), batch=2, steps=1, kind="vae")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_target_follows_the_prediction_type(prediction_type):
    """A model that outputs the exact target has zero loss: the target is what the scheduler expects."""
    scheduler = build_scheduler({**SCHED, "prediction_type": prediction_type})
    x = torch.rand(2, 1, 8, 8, 8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x, noise, t), "sample": x}[prediction_type]

    def oracle(x_t, timesteps):
        return target

    assert diffusion_loss(oracle, scheduler, x, torch.Generator().manual_seed(0)).item() == pytest.approx(0, abs=1e-10)
    assert build_ddim({**SCHED, "prediction_type": prediction_type}, 10).prediction_type == prediction_type


def test_low_precision_group_norm_runs_in_bf16_with_the_same_result():
    from brainddpm.models.diffusion import LowPrecisionGroupNorm, use_low_precision_norms

    torch.manual_seed(0)
    net = build_model(base_config()["model"])
    keys = list(net.state_dict())
    assert use_low_precision_norms(net) > 0 and list(net.state_dict()) == keys  # checkpoints do not change
    norm = next(m for m in net.modules() if isinstance(m, LowPrecisionGroupNorm))
    reference = torch.nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
    reference.load_state_dict(norm.state_dict())
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(norm.weight)
    x = torch.randn(2, norm.num_channels, 6, 6, 6) * 3 + 1
    assert torch.equal(norm(x), reference(x))  # outside autocast: a plain GroupNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = reference(x)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    out.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
