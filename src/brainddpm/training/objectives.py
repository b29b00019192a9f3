"""What the engine minimises, one class per kind of model the workflow trains.

An objective is called by `Engine.micro_step` as `objective(model, x, context, generator, step)` and returns
the micro-batch's loss; `model` is whatever the backend wrapped (DeepSpeed engine, Accelerate/DDP module, or
the bare network). After the backward (and, at an accumulation boundary, the optimizer step) of that loss the
engine calls `objective.finish_micro_step(boundary)`: the adversarial loss steps its discriminator there.

Random draws (noise, timesteps, patch corners, condition dropping) come from `generator`, whose state is
checkpointed, so a resumed run continues exactly. One exception: AutoencoderKL's posterior sample
(z = mu + sigma * eps) draws eps inside MONAI's forward from the global RNG, which cannot be handed a
generator through a backend's wrapper; the global CPU and CUDA states are checkpointed per rank too
(training/checkpoint.py), and the loop's DataLoader has its own generator so as not to draw from them.

* `DiffusionObjective`: the denoising MSE of models/diffusion.py (pixel or latent DDPM).
* `AutoencoderObjective`: L1 reconstruction + KL (+ MONAI PerceptualLoss) (+ least-squares adversarial loss
  against a `Discriminator`), on whole padded volumes or random patches: the losses of MONAI's 3d_ldm tutorial
  and of Pinaya et al. 2022.
* `Discriminator`: the adversarial loss's second network and its own optimizer, which the autoencoder's objective
  owns and steps (see its docstring for why it is not a second DeepSpeed engine).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from brainddpm.errors import ConfigError
from brainddpm.models.autoencoder import build_discriminator, kl_divergence, pad_to, padded_shape
from brainddpm.models.diffusion import diffusion_loss
from brainddpm.training.precision import autocast


class DiffusionObjective:
    """Noise-prediction (or v-/sample-prediction) MSE; a conditional model's context is dropped with `drop_prob`."""

    def __init__(self, scheduler, drop_prob: float = 0.0) -> None:
        self.scheduler, self.drop_prob = scheduler, drop_prob

    def __call__(self, model, x, context, generator, step: int) -> torch.Tensor:
        return diffusion_loss(model, self.scheduler, x, generator, context, self.drop_prob)

    def finish_micro_step(self, boundary: bool) -> None:
        """Nothing to do after the backward: the DDPM has one network."""


def random_patches(x: torch.Tensor, patch, generator: torch.Generator) -> torch.Tensor:
    """One random patch of size `patch` per volume of `x` [B, 1, D, H, W], corners drawn from `generator`."""
    highs = [s - p + 1 for s, p in zip(x.shape[2:], patch)]
    corners = [[int(torch.randint(0, h, (1,), generator=generator, device=generator.device)) for h in highs]
               for _ in range(x.shape[0])]
    return torch.stack([v[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] for v, (a, b, c) in zip(x, corners)])


def perceptual_loss(perceptual_cfg: dict) -> torch.nn.Module:
    """MONAI's PerceptualLoss (3D MedicalNet features) from weights already on disk, never downloaded here.

    MONAI loads its networks through torch.hub; `brainddpm fetch-perceptual-weights` (a local rule: the login
    node has the internet, compute nodes do not) fills `perceptual.cache_dir`, and a job only reads it."""
    from monai.losses import PerceptualLoss

    cache = Path(perceptual_cfg["cache_dir"])
    weights = [p for pattern in ("*.pth", "*.pt") for p in cache.rglob(pattern)] if cache.is_dir() else []
    if not (cache.is_dir() and any(cache.rglob("hubconf.py")) and weights):
        raise ConfigError(f"config key 'autoencoder.perceptual.cache_dir': {cache} holds no torch.hub copy of the "
                          f"{perceptual_cfg['network']} network; a training job never downloads: run "
                          "`brainddpm fetch-perceptual-weights` where there is internet (the login node), or set "
                          "autoencoder.perceptual.weight: 0")
    return PerceptualLoss(spatial_dims=3, network_type=perceptual_cfg["network"], is_fake_3d=False,
                          cache_dir=str(cache), channel_wise=False)


class Discriminator:
    """The adversarial loss's PatchDiscriminator and its Adam, stepped by the autoencoder's objective after each of
    the autoencoder's micro-steps.

    Written by hand beside the engine's backends: DeepSpeed drives one optimizer per engine, and a second
    DeepSpeed engine for a network of a few MB would only duplicate its machinery. The discriminator is
    small, so every rank holds all of it (plain torch): its gradients are accumulated like the main
    network's and averaged over ranks with one all-reduce per optimizer step. Its state is checkpointed
    with the run (`state_dict`), so a resumed run is exact as without it.
    """

    def __init__(self, adversarial_cfg: dict, train_cfg: dict, device: torch.device, bf16: bool,
                 accumulation: int, world_size: int) -> None:
        self.net = build_discriminator(adversarial_cfg).to(device).train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=float(adversarial_cfg.get("lr") or train_cfg["lr"]),
                                          betas=tuple(train_cfg["betas"]))
        self.weight, self.start_step = float(adversarial_cfg["weight"]), int(adversarial_cfg["start_step"])
        self.bf16, self.accumulation, self.world_size = bf16, accumulation, world_size
        if world_size > 1:  # every rank starts from rank 0's weights (as DDP does for the main network)
            for value in self.net.state_dict().values():
                dist.broadcast(value, 0)

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """The autoencoder's adversarial term: least squares towards "real". The discriminator's own weights
        get no gradient from it (they are frozen for this call)."""
        self.net.requires_grad_(False)
        try:  # under autocast: DeepSpeed hands back a bf16 reconstruction (it autocasts inside its forward only)
            with autocast(fake.device, self.bf16):
                logits = self.net(fake)[-1]
        finally:
            self.net.requires_grad_(True)
        return F.mse_loss(logits.float(), torch.ones_like(logits, dtype=torch.float32))

    def micro_step(self, real: torch.Tensor, fake: torch.Tensor, boundary: bool) -> None:
        with autocast(real.device, self.bf16):
            logits_fake, logits_real = self.net(fake.detach())[-1], self.net(real)[-1]
        loss = 0.5 * (F.mse_loss(logits_fake.float(), torch.zeros_like(logits_fake, dtype=torch.float32))
                      + F.mse_loss(logits_real.float(), torch.ones_like(logits_real, dtype=torch.float32)))
        (loss / self.accumulation).backward()
        if not boundary:
            return
        if self.world_size > 1:
            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class AutoencoderObjective:
    """L1 + kl_weight x KL (+ perceptual) (+ adversarial from `discriminator.start_step` on)."""

    def __init__(self, ae_cfg: dict, discriminator: Discriminator | None = None,
                 perceptual: torch.nn.Module | None = None) -> None:
        self.patch = list(ae_cfg["patch"]) if ae_cfg.get("patch") else None
        self.pad_multiple = int(ae_cfg["pad_multiple"])
        self.kl_weight = float(ae_cfg["kl_weight"])
        self.perceptual, self.perceptual_weight = perceptual, float(ae_cfg["perceptual"]["weight"])
        self.discriminator = discriminator
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, reconstruction) for the discriminator

    def inputs(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """What the network sees: random patches, or the whole volume padded to `pad_multiple`."""
        if self.patch:
            return random_patches(x, self.patch, generator)
        return pad_to(x, padded_shape(x.shape[2:], self.pad_multiple))

    def __call__(self, model, x, context, generator, step: int) -> torch.Tensor:
        x = self.inputs(x, generator)
        reconstruction, z_mu, z_sigma = model(x)
        loss = F.l1_loss(reconstruction.float(), x.float()) + self.kl_weight * kl_divergence(z_mu, z_sigma)
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(reconstruction.float(), x.float())
        if self.discriminator is not None and self.discriminator.active(step):
            loss = loss + self.discriminator.weight * self.discriminator.generator_loss(reconstruction)
            self._pending = (x.detach(), reconstruction.detach())
        return loss

    def finish_micro_step(self, boundary: bool) -> None:
        """Step the discriminator on this micro-batch's input and reconstruction, once the autoencoder's backward
        is done (its graph reads the discriminator's weights, which the discriminator's optimizer changes)."""
        if self._pending is not None:
            real, fake = self._pending
            self._pending = None
            self.discriminator.micro_step(real, fake, boundary)
