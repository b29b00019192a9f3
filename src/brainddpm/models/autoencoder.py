"""The autoencoder of latent diffusion, straight from MONAI: AutoencoderKL, its losses, and the codec around it.

`build_autoencoder` turns the `autoencoder` config section into MONAI's `AutoencoderKL` (3D, one channel in
and out); `build_discriminator` gives the optional adversarial loss's `PatchDiscriminator`. What is written
here is only what MONAI leaves to the caller:

* padding: a volume is zero-padded at the far end of each axis to a multiple of `autoencoder.pad_multiple`
  (the compression factor times what the latent UNet needs), and decoded volumes are cropped back;
* the latent scale factor (Rombach et al. 2022): latents are stored multiplied by 1/std of the training
  latents, so the diffusion model sees unit variance; `decode_latents` divides it out again. MONAI's 3d_ldm
  tutorial computes it in training and then samples with 1.0: here it travels in the autoencoder file, the
  latent shards' index and the latent diffusion model, and is compared wherever two of them meet;
* decoding a whole volume, or window by window with MONAI's `sliding_window_inference` (Gaussian blending)
  when `decode.roi` is set: the window is given in latent voxels, and MONAI scales the output windows by the
  decoder's compression (its `zoom` handling of predictors whose output is larger than their input).

Encoding uses the posterior mean (z_mu), not a draw: a volume's latent is the same in any job and any batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from brainddpm.errors import CheckpointError
from brainddpm.fileio import sha256_file
from brainddpm.models.final import read_final


def build_autoencoder(ae_cfg: dict) -> AutoencoderKL:
    """MONAI AutoencoderKL for single-channel 3D volumes, from the `autoencoder` config section."""
    levels = len(ae_cfg["channels"])
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1,
        channels=list(ae_cfg["channels"]),
        latent_channels=int(ae_cfg["latent_channels"]),
        num_res_blocks=[int(ae_cfg["num_res_blocks"])] * levels,
        attention_levels=list(ae_cfg["attention_levels"]),
        norm_num_groups=int(ae_cfg["norm_num_groups"]),
        with_encoder_nonlocal_attn=bool(ae_cfg.get("mid_attention", False)),
        with_decoder_nonlocal_attn=bool(ae_cfg.get("mid_attention", False)),
        use_checkpoint=bool(ae_cfg.get("use_checkpoint", False)),
        use_flash_attention=bool(ae_cfg.get("use_flash_attention", False)),
    )


def build_discriminator(adversarial_cfg: dict) -> PatchDiscriminator:
    """MONAI PatchDiscriminator (least-squares GAN, as MONAI's 3d_ldm tutorial). Instance norm, not MONAI's
    default batch norm: training batches of one or two volumes would make batch statistics meaningless."""
    return PatchDiscriminator(spatial_dims=3, in_channels=1, out_channels=1,
                              channels=int(adversarial_cfg["channels"]), num_layers_d=int(adversarial_cfg["layers"]),
                              norm="INSTANCE")


def compression(ae_cfg: dict) -> int:
    """Downsampling factor per axis: one halving between consecutive channel levels."""
    return 2 ** (len(ae_cfg["channels"]) - 1)


def padded_shape(shape, multiple: int) -> tuple[int, ...]:
    return tuple(int(math.ceil(s / multiple) * multiple) for s in shape)


def latent_shape(ae_cfg: dict, image_shape) -> tuple[int, ...]:
    """(channels, d, h, w) of the latent of a volume of `image_shape` (after padding)."""
    padded = padded_shape(image_shape, int(ae_cfg["pad_multiple"]))
    return (int(ae_cfg["latent_channels"]), *(s // compression(ae_cfg) for s in padded))


def pad_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Zero-pad (background) the spatial axes of `x` [B, C, D, H, W] at their far end up to `shape`."""
    extra = [target - have for have, target in zip(x.shape[2:], shape)]
    if not any(extra):
        return x
    return F.pad(x, [p for e in reversed(extra) for p in (0, e)])


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent and averaged over the batch (MONAI's tutorials' form)."""
    kl = 0.5 * (z_mu.float().square() + z_sigma.float().square() - torch.log(z_sigma.float().square() + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


@torch.no_grad()
def encode_volumes(autoencoder: AutoencoderKL, x: torch.Tensor, ae_cfg: dict) -> torch.Tensor:
    """Posterior means of volumes `x` [B, 1, D, H, W] (padded to `pad_multiple` first), unscaled."""
    x = pad_to(x, padded_shape(x.shape[2:], int(ae_cfg["pad_multiple"])))
    z_mu, _ = autoencoder.encode(x)
    return z_mu.float()


@torch.no_grad()
def decode_latents(autoencoder: AutoencoderKL, z: torch.Tensor, scale_factor: float, image_shape,
                   decode_cfg: dict | None = None) -> torch.Tensor:
    """Volumes [B, 1, *image_shape] in [0, 1] from scaled latents `z` [B, C, d, h, w]: undo the scale, decode
    (whole, or by windows of `decode.roi` latent voxels with Gaussian blending), crop the padding away."""
    z = z / scale_factor
    roi = (decode_cfg or {}).get("roi")
    if roi:
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(z, roi_size=list(roi), sw_batch_size=int(decode_cfg.get("sw_batch_size", 1)),
                                       predictor=autoencoder.decode, overlap=float(decode_cfg.get("overlap", 0.25)),
                                       mode="gaussian", progress=False)
    else:
        out = autoencoder.decode(z)
    d, h, w = image_shape
    return out[:, :, :d, :h, :w].float().clamp_(0.0, 1.0)


def load_autoencoder(path: Path, device: str | torch.device = "cpu") -> tuple[AutoencoderKL, dict]:
    """Rebuild the trained autoencoder from its file alone: (model in eval mode, config with "autoencoder",
    "data", "scale_factor", "sha256"). A diffusion model's file is refused."""
    config, weights = read_final(path)
    if config.get("kind") != "autoencoder":
        raise CheckpointError(f"{path}: not an autoencoder file (it holds a {config.get('kind', 'diffusion')} model); "
                              "expected the autoencoder.safetensors written by `brainddpm train-autoencoder`")
    missing = [k for k in ("autoencoder", "data", "scale_factor") if not config.get(k)]
    if missing:
        raise CheckpointError(f"{path}: its metadata lacks {', '.join(missing)}; retrain the autoencoder")
    model = build_autoencoder(config["autoencoder"])
    model.load_state_dict(weights, strict=True)
    config["sha256"] = sha256_file(path)
    return model.to(device).eval(), config
