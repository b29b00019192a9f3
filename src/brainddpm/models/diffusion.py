"""The denoising network, the noise schedules and the training objective, straight from MONAI.

`build_model` turns the `model` config section into MONAI's DiffusionModelUNet (3D, one channel in and
out); `build_scheduler` and `build_ddim` turn the `scheduler` section into MONAI's DDPM and DDIM
schedulers with the same betas, or (`scheduler.kind: rflow`) MONAI's RFlowScheduler (rectified flow, as
MAISI-v2). `diffusion_loss` is the noise-prediction MSE of Ho et al. (2020), the objective of the reference
study, written out (what MONAI's DiffusionInferer does) so the random draws come from an explicit generator
and resume exactly; under rflow, the velocity (clean volume minus noise) MSE of MONAI's RFlowScheduler.

MONAI's RFlowScheduler, checked in the installed version (MONAI 1.6): `sample_timesteps` draws from torch's
global RNG, so `rflow_timesteps` draws the same distribution from the training generator (an exact resume
replays it); `transform_scale` is stored but never passed to `timestep_transform` (neither in
`set_timesteps` nor in `sample_timesteps`), so it has no effect, as reported for MONAI 1.5.0; `set_timesteps`
rounds continuous timesteps to float16; MAISI's `scale: 1.4` is the logit-normal scale, inert with its
`sample_method: uniform`. The defaults here are MAISI-v2's: continuous timesteps, uniform sampling, the
resolution-dependent timestep transform with MONAI's base of 32x32x32 voxels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

from brainddpm.config import scheduler_kind


def build_model(model_cfg: dict, context_dim: int | None = None, channels: int = 1) -> DiffusionModelUNet:
    """MONAI DiffusionModelUNet for 3D volumes of `channels` channels in and out (1 for images, the
    autoencoder's latent channels for latent diffusion), from the `model` config section.

    With `context_dim` (a conditional model, conditioning.py) MONAI's own conditioning is switched on:
    `with_conditioning=True` and `cross_attention_dim=context_dim`, so every attention level (and the
    middle block) cross-attends to the covariate vector passed as `context` ([B, 1, context_dim]).

    `num_head_channels` is one number in the config; MONAI takes one per level and ignores it at levels
    without attention. The middle block of the UNet always has self-attention over the last level's
    channels, so it must divide `channels[-1]` even when `attention_levels[-1]` is false.
    """
    levels = list(model_cfg["channels"])
    heads = int(model_cfg["num_head_channels"])
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=channels,
        out_channels=channels,
        channels=levels,
        attention_levels=list(model_cfg["attention_levels"]),
        num_res_blocks=int(model_cfg["num_res_blocks"]),
        num_head_channels=[heads] * len(levels),
        norm_num_groups=int(model_cfg["norm_num_groups"]),
        use_flash_attention=bool(model_cfg.get("use_flash_attention", False)),
        **({"with_conditioning": True, "cross_attention_dim": int(context_dim)} if context_dim else {}),
    )


class LowPrecisionGroupNorm(torch.nn.GroupNorm):
    """GroupNorm that runs in bf16 under bf16 autocast, instead of autocast's fp32.

    Autocast lists group_norm among the ops it runs in fp32: each of the UNet's GroupNorms then reads a
    bf16 activation, casts it to fp32, normalises, writes fp32, and the next convolution casts it back:
    three passes over the activation where one would do (on one H100, fp32 GroupNorm and the casts around
    it were a third of the step's kernel time, docs/benchmarks.md). Here the input stays bf16 and autocast
    is off around `group_norm`; PyTorch's GroupNorm kernels accumulate the mean and variance of bf16
    inputs in fp32, so only the normalised output is rounded to bf16. The weights stay fp32 (cast per call),
    and outside bf16 autocast this is a plain GroupNorm. Not in MONAI or PyTorch, hence written here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            x = x.to(torch.bfloat16)
            weight = None if self.weight is None else self.weight.to(torch.bfloat16)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def use_low_precision_norms(net: torch.nn.Module) -> int:
    """Turn every GroupNorm of `net` into a LowPrecisionGroupNorm, in place (same parameters and state dict
    keys, so checkpoints and model files do not change); returns how many were turned."""
    count = 0
    for module in net.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = LowPrecisionGroupNorm
            count += 1
    return count


def _schedule_args(sched_cfg: dict, clip: bool = True) -> dict:
    # images live in [0, 1] (data stage): clip the predicted x0 there, not to MONAI's default [-1, 1];
    # latents are unbounded (clip=False)
    args = {"num_train_timesteps": int(sched_cfg["num_train_timesteps"]), "schedule": sched_cfg["schedule"],
            "clip_sample": clip, "clip_sample_min": 0.0, "clip_sample_max": 1.0,
            # models saved before prediction_type was configurable predicted the noise
            "prediction_type": sched_cfg.get("prediction_type", "epsilon")}
    if sched_cfg["schedule"] != "cosine":  # MONAI's cosine schedule takes no beta range
        args.update(beta_start=float(sched_cfg["beta_start"]), beta_end=float(sched_cfg["beta_end"]))
    return args


def build_rflow(sched_cfg: dict) -> RFlowScheduler:
    """MONAI RFlowScheduler from the `scheduler` section (`num_train_timesteps`, `rflow.*`)."""
    rflow = sched_cfg["rflow"]
    return RFlowScheduler(num_train_timesteps=int(sched_cfg["num_train_timesteps"]),
                          use_discrete_timesteps=bool(rflow["use_discrete_timesteps"]),
                          sample_method=rflow["sample_method"], loc=float(rflow["loc"]), scale=float(rflow["scale"]),
                          use_timestep_transform=bool(rflow["use_timestep_transform"]),
                          base_img_size_numel=int(rflow["base_img_size_numel"]), spatial_dim=3)


def build_scheduler(sched_cfg: dict, clip: bool = True) -> DDPMScheduler | RFlowScheduler:
    """The training scheduler of the `scheduler` section: MONAI DDPMScheduler (the reference study's), or
    RFlowScheduler under `kind: rflow`; `clip`: clip the predicted clean volume to [0, 1] (DDPM images; not
    latents)."""
    if scheduler_kind(sched_cfg) == "rflow":
        return build_rflow(sched_cfg)
    return DDPMScheduler(**_schedule_args(sched_cfg, clip))


def rflow_timesteps(scheduler: RFlowScheduler, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`RFlowScheduler.sample_timesteps`, drawn from `generator` (MONAI's draws from the global RNG, which an
    exact resume cannot replay): uniform or logit-normal in [0, T), discrete when asked, then MONAI's own
    resolution-dependent `timestep_transform`."""
    n, total = x.shape[0], scheduler.num_train_timesteps
    if scheduler.sample_method == "uniform":
        t = torch.rand((n,), generator=generator, device=x.device) * total
    else:  # logit-normal: the sigmoid of a normal (torch's one-dimensional LogisticNormal)
        loc, scale = (float(v) for v in (scheduler.distribution.loc, scheduler.distribution.scale))
        t = torch.sigmoid(loc + scale * torch.randn((n,), generator=generator, device=x.device)) * total
    if scheduler.use_discrete_timesteps:
        t = t.long()
    if scheduler.use_timestep_transform:
        t = timestep_transform(t, input_img_size_numel=math.prod(x.shape[2:]),
                               base_img_size_numel=scheduler.base_img_size_numel, num_train_timesteps=total,
                               spatial_dim=x.ndim - 2)
    return t


def build_ddim(sched_cfg: dict, steps: int, clip: bool = True) -> DDIMScheduler:
    """MONAI DDIMScheduler with the same betas as `build_scheduler`, set to `steps` inference steps."""
    ddim = DDIMScheduler(**_schedule_args(sched_cfg, clip))
    ddim.set_timesteps(int(steps))
    return ddim


def drop_condition(context: torch.Tensor, drop_prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Classifier-free guidance training: each volume's whole condition becomes the null condition
    (filled with conditioning.NULL_FILL, MONAI's `cfg_fill_value`) with probability `drop_prob`."""
    from brainddpm.models.conditioning import NULL_FILL

    drop = torch.rand(context.shape[0], generator=generator, device=context.device) < drop_prob
    return torch.where(drop[:, None, None], torch.full_like(context, NULL_FILL), context)


def diffusion_loss(model: torch.nn.Module, scheduler: DDPMScheduler, x: torch.Tensor,
                   generator: torch.Generator | None = None, context: torch.Tensor | None = None,
                   drop_prob: float = 0.0) -> torch.Tensor:
    """Denoising MSE: draw noise and uniform timesteps, noise `x`, predict the scheduler's target.

    The target follows `scheduler.prediction_type`: the noise ("epsilon", Ho et al. 2020, the study's),
    the velocity ("v_prediction", Salimans & Ho 2022: `scheduler.get_velocity`) or the clean volume
    ("sample"); under rflow (an RFlowScheduler) the velocity x - noise at a timestep of `rflow_timesteps`.
    `model` may be the bare UNet or a DDP/DeepSpeed/Accelerate wrapper around it. The loss
    is computed in fp32 even under bf16 autocast. A conditional model gets its `context`, dropped per
    volume with `drop_prob` (drawn after the noise and timesteps, so an unconditional run's draws are
    exactly what they always were).
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rflow = isinstance(scheduler, RFlowScheduler)
    if rflow:
        t = rflow_timesteps(scheduler, x, generator)
    else:
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), generator=generator, device=x.device)
    x_t = scheduler.add_noise(original_samples=x, noise=noise, timesteps=t)
    if context is None:
        pred = model(x_t, timesteps=t)
    else:
        pred = model(x_t, timesteps=t, context=drop_condition(context, drop_prob, generator))
    if rflow:  # MONAI's rectified-flow velocity: from the noise towards the clean volume
        target = x - noise
    elif scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x, noise, t)
    elif scheduler.prediction_type == "sample":
        target = x
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())
