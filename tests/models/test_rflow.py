"""Rectified flow (scheduler.kind: rflow) through MONAI's RFlowScheduler: timesteps from the run's generator with
MONAI's distribution, MONAI's noising, the velocity target."""

import numpy as np
import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from brainddpm.config import scheduler_section
from brainddpm.models.diffusion import build_scheduler, diffusion_loss, rflow_timesteps
from helpers import base_config


@pytest.mark.parametrize("method", ["uniform", "logit-normal"])
def test_timesteps_follow_monai_s_distribution_and_the_generator(method):
    cfg = base_config(scheduler={"kind": "rflow", "rflow": {"sample_method": method}}, sample={"samplers": ["rflow"]})
    scheduler = build_scheduler(cfg["scheduler"])
    assert isinstance(scheduler, RFlowScheduler) and scheduler.use_timestep_transform
    x = torch.zeros(20000, 1, 1, 1, 1).expand(20000, 1, 24, 32, 24)  # only its shape is read
    ours = rflow_timesteps(scheduler, x, torch.Generator().manual_seed(3))
    again = rflow_timesteps(scheduler, x, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    monai = scheduler.sample_timesteps(x)
    assert torch.equal(ours, again)  # from the generator, not the global RNG: an exact resume replays it
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    difference = (torch.quantile(ours.float(), quantiles) - torch.quantile(monai.float(), quantiles)).abs().max()
    assert difference < 0.02 * scheduler.num_train_timesteps, difference


def test_the_loss_is_the_velocity_from_noise_to_volume():
    cfg = base_config(scheduler={"kind": "rflow"}, sample={"samplers": ["rflow"]})
    scheduler = build_scheduler(cfg["scheduler"])
    x = torch.rand(3, 1, 4, 4, 4)

    class Perfect(torch.nn.Module):  # knows the clean volume: its velocity is (x_t - noise) / (1 - t/T) - noise
        def forward(self, x_t, timesteps):
            generator = torch.Generator().manual_seed(5)
            noise = torch.randn(x.shape, generator=generator)
            return x - noise

    loss = diffusion_loss(Perfect(), scheduler, x, torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_a_ddpm_scheduler_section_compares_as_before_rflow_existed():
    cfg = base_config()
    assert cfg["scheduler"]["kind"] == "ddpm"
    assert "kind" not in scheduler_section(cfg["scheduler"]) and "rflow" not in scheduler_section(cfg["scheduler"])
    flow = base_config(scheduler={"kind": "rflow"}, sample={"samplers": ["rflow"]})["scheduler"]
    assert scheduler_section(flow) == flow
    assert np.isclose(flow["rflow"]["base_img_size_numel"], 32 ** 3)
