"""What one training run trains: the network, its objective and what its final file holds.

The loop (loop.py) and the engine are the same for every model; a `Task` is the part that differs:

* "diffusion": MONAI's DiffusionModelUNet on image shards (the pixel DDPM of the study) or on latent shards
  (latent diffusion: the UNet takes the autoencoder's latent channels, and the final file records the
  latent shape, the scale factor and which autoencoder made the latents). Conditioning works on both.
* "autoencoder": MONAI's AutoencoderKL on image shards, with the optional discriminator and perceptual
  loss; its final file holds the latent scale factor, computed over the training split at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainddpm.config import is_conditioned, is_latent
from brainddpm.data.dataset import ShardDataset
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.models.autoencoder import build_autoencoder, encode_volumes
from brainddpm.models.conditioning import CovariateEncoding, fit_encoding
from brainddpm.models.diffusion import build_model, build_scheduler
from brainddpm.training.engine import RunPlan
from brainddpm.training.finetune import Base, check_base, read_base, start_from_base
from brainddpm.training.flops import count_flops, flops_per_sample, peak_flops
from brainddpm.training.objectives import AutoencoderObjective, DiffusionObjective, Discriminator, perceptual_loss
from brainddpm.training.runtime import Runtime

log = logging.getLogger(__name__)

KINDS = ("diffusion", "autoencoder")


@dataclass
class Task:
    """The run's network (bare, on its device), its objective and its final file."""
    kind: str
    net: torch.nn.Module
    objective: Callable
    output: str  # the final weights' file name in the run folder
    compared_sections: tuple[str, ...]  # config sections a checkpoint must share to be resumed
    final_config: Callable[[dict], dict]  # EMA weights -> the final file's config (called on rank 0 only)
    flops: int | None = None
    discriminator: Discriminator | None = None
    encoding: CovariateEncoding | None = field(default=None)
    base: Base | None = None  # the model a fine-tuning run starts from (finetune.py)


def check_kind(kind: str) -> None:
    """A ConfigError for a kind of model that no task trains (before any data is read or job submitted)."""
    if kind not in KINDS:
        raise ConfigError(f"training kind {kind!r}: unknown; brainddpm trains {' or '.join(KINDS)} models "
                          "(`brainddpm train` or `brainddpm train-autoencoder`)")


def build_task(kind: str, cfg: dict, dataset: ShardDataset, split: Path, data_meta: dict, runtime: Runtime,
               plan: RunPlan) -> Task:
    check_kind(kind)
    build = autoencoder_task if kind == "autoencoder" else diffusion_task
    return build(cfg, dataset, split, data_meta, runtime, plan)


def _check_data_kind(cfg: dict, data_meta: dict, split: Path, kind: str) -> None:
    latent_data = "latent_shape" in data_meta
    if kind == "autoencoder":
        if latent_data:
            raise BadInputError(split / "index.json", "holds latents; the autoencoder trains on image shards")
        return
    if latent_data != is_latent(cfg):
        what = "latents" if latent_data else "image volumes"
        raise BadInputError(split / "index.json", f"holds {what}, but config key 'model.kind' is "
                            f"{cfg['model'].get('kind', 'pixel')}: train a latent model on the latent shards "
                            "(results/latents/...) and a pixel model on the image shards")


def diffusion_task(cfg: dict, dataset: ShardDataset, split: Path, data_meta: dict, runtime: Runtime,
                   plan: RunPlan) -> Task:
    _check_data_kind(cfg, data_meta, split, "diffusion")
    base = read_base(cfg)
    if base is not None:
        check_base(base, cfg, data_meta)
    encoding = condition_dataset(cfg, dataset, split, base.encoding if base else None)
    context_dim = encoding.dim if encoding else None
    shape = data_meta.get("latent_shape") or [1, *data_meta["target_shape"]]
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    net = build_model(cfg["model"], context_dim, channels=shape[0]).to(runtime.device).train()
    if base is not None:
        start_from_base(net, base, cfg["finetune"]["freeze"])
    scheduler = build_scheduler(cfg["scheduler"])
    drop_prob = cfg["condition"]["drop_prob"] if encoding else 0.0

    def final_config(ema: dict) -> dict:
        config = {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data_meta}
        if encoding is not None:  # sampling needs nothing but this file
            config["condition"] = {**encoding.to_dict(), "drop_prob": cfg["condition"]["drop_prob"]}
        if base is not None:
            config["base"] = base.provenance()
        return config

    flops = flops_per_sample(net, shape[1:], runtime.device, plan.bf16, scheduler.num_train_timesteps, context_dim,
                             shape[0]) if peak_flops(runtime.device) else None
    return Task("diffusion", net, DiffusionObjective(scheduler, drop_prob), "model.safetensors",
                ("model", "scheduler", "seed", "finetune"), final_config, flops, encoding=encoding, base=base)


def autoencoder_task(cfg: dict, dataset: ShardDataset, split: Path, data_meta: dict, runtime: Runtime,
                     plan: RunPlan) -> Task:
    """The autoencoder; its FLOPs (for MFU) count the autoencoder alone, not the discriminator's or the
    perceptual network's passes, so its MFU reads a little high when those losses are on."""
    ae_cfg = cfg["autoencoder"]
    _check_data_kind(cfg, data_meta, split, "autoencoder")
    if ae_cfg.get("patch") and any(p > s for p, s in zip(ae_cfg["patch"], data_meta["target_shape"])):
        raise ConfigError(f"config key 'autoencoder.patch': {ae_cfg['patch']} is larger than the volumes "
                          f"({data_meta['target_shape']}) of {split}")
    torch.manual_seed(cfg["seed"])
    net, objective, discriminator = autoencoder_parts(ae_cfg, cfg["train"], runtime, plan.bf16,
                                                      plan.gradient_accumulation_steps)

    def final_config(ema: dict) -> dict:
        scale = latent_scale_factor(ema, ae_cfg, dataset, runtime.device)
        return {"kind": "autoencoder", "autoencoder": ae_cfg, "data": data_meta, "scale_factor": scale}

    flops = autoencoder_flops(net, objective, ae_cfg, data_meta["target_shape"], runtime.device, plan.bf16) \
        if peak_flops(runtime.device) else None
    return Task("autoencoder", net, objective, "autoencoder.safetensors", ("autoencoder", "seed"), final_config,
                flops, discriminator)


def autoencoder_parts(ae_cfg: dict, train_cfg: dict, runtime: Runtime, bf16: bool, accumulation: int,
                      perceptual: bool = True) -> tuple[torch.nn.Module, AutoencoderObjective, Discriminator | None]:
    """The autoencoder on the runtime's device, its objective and its discriminator (adversarial weight > 0).
    `perceptual`: False leaves the perceptual loss out (the benchmark: its weights are never downloaded)."""
    net = build_autoencoder(ae_cfg).to(runtime.device).train()
    discriminator = None
    if ae_cfg["adversarial"]["weight"] > 0:
        discriminator = Discriminator(ae_cfg["adversarial"], train_cfg, runtime.device, bf16, accumulation,
                                      runtime.world_size)
    loss = perceptual_loss(ae_cfg["perceptual"]).to(runtime.device) \
        if perceptual and ae_cfg["perceptual"]["weight"] > 0 else None
    return net, AutoencoderObjective(ae_cfg, discriminator, loss), discriminator


def autoencoder_flops(net: torch.nn.Module, objective: AutoencoderObjective, ae_cfg: dict, target_shape,
                      device: torch.device, bf16: bool) -> int:
    """FLOPs of one training forward + backward of the autoencoder alone on one input (a patch, or the volume
    padded), its recomputation included with use_checkpoint."""
    example = list(ae_cfg["patch"]) if ae_cfg.get("patch") else list(target_shape)
    return count_flops(lambda x: net(objective.inputs(x, torch.Generator(x.device)))[0], net, [1, *example],
                       device, bf16)


SCALE_VOLUMES = 64  # training volumes the latent scale factor is estimated on


@torch.no_grad()
def latent_scale_factor(ema: dict, ae_cfg: dict, dataset: ShardDataset, device: torch.device) -> float:
    """1 / std of the training split's latents (posterior means, every value of every volume; at most
    SCALE_VOLUMES volumes, evenly spaced: MONAI's tutorials take one batch), under the exported (EMA) weights:
    the factor that gives the diffusion model unit-variance inputs. Rank 0 computes it while the other
    ranks wait at the end of training, so it is kept to seconds."""
    autoencoder = build_autoencoder(ae_cfg)
    autoencoder.load_state_dict({k: v.to(torch.float32) for k, v in ema.items()})
    autoencoder = autoencoder.to(device).eval()
    total, total_sq, count = 0.0, 0.0, 0
    chosen = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), SCALE_VOLUMES)).round().astype(int))
    for i in chosen:
        x = dataset[i][0][None].to(device)
        z = encode_volumes(autoencoder, x, ae_cfg).double()
        total, total_sq, count = total + float(z.sum()), total_sq + float(z.square().sum()), count + z.numel()
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))
    log.info("latent scale factor 1/std = %.5f over %d training volumes", 1.0 / std, len(chosen))
    return 1.0 / std


def condition_dataset(cfg: dict, dataset: ShardDataset, split: Path,
                      fitted: CovariateEncoding | None = None) -> CovariateEncoding | None:
    """For a conditional run: fit the covariate encoding on the training split (or take a fine-tuning base's
    `fitted` one) and attach each volume's condition vector to `dataset`; None for an unconditional run."""
    if not is_conditioned(cfg):
        return None
    if any("covariates" not in m for m in dataset.meta):
        raise BadInputError(split / "index.json", "the training shards hold no covariates: they were written "
                            "without condition.covariates; rerun the data stage with this config")
    covariates = [m["covariates"] for m in dataset.meta]
    encoding = fitted or fit_encoding(cfg["condition"], covariates, source=str(split / "index.json"))
    try:
        dataset.conditions = encoding.vectors(covariates)
    except (BadInputError, ConfigError) as exc:
        if fitted is None:
            raise
        raise ConfigError(f"config key 'finetune.init_from': the base model's covariate encoding cannot encode "
                          f"the training split {split / 'index.json'}: {exc}") from None
    log.info("conditioning on %s (vector of %d, drop probability %.2f)", ", ".join(encoding.names), encoding.dim,
             cfg["condition"]["drop_prob"])
    for name in encoding.names:
        have = sum(1 for c in covariates if c.get(name) is not None)
        log.info("covariate %s: %d of %d training volumes have a value", name, have, len(covariates))
    return encoding
