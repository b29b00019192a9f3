"""Sampling a latent model: latents denoised without clipping, the scale factor undone, decoded by the very
autoencoder that made the training latents (another one is refused)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from brainddpm.data.nifti import grid_affine
from brainddpm.errors import BadInputError, CheckpointError
from brainddpm.fileio import sha256_file
from brainddpm.models.autoencoder import build_autoencoder, decode_latents
from brainddpm.models.diffusion import build_model
from brainddpm.models.final import load_final, save_final
from brainddpm.sampling.sample import denoise, make_scheduler, run_sample
from helpers import SHAPE, TINY_AUTOENCODER

UNET = {"kind": "latent", "channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}
SCHEDULER = {"num_train_timesteps": 50, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
             "prediction_type": "epsilon"}
SCALE = 2.5


def _files(tmp_path, scale=SCALE, model_scale=None, other_autoencoder=False):
    torch.manual_seed(0)
    ae = tmp_path / "autoencoder.safetensors"
    save_final(ae, build_autoencoder(TINY_AUTOENCODER).state_dict(),
               {"kind": "autoencoder", "autoencoder": TINY_AUTOENCODER, "data": {"target_shape": list(SHAPE)},
                "scale_factor": scale}, 1)
    sha = "0" * 64 if other_autoencoder else sha256_file(ae)
    data = {"target_shape": list(SHAPE), "affine": grid_affine(SHAPE, (1.0,) * 3, (0.0,) * 3).tolist(),
            "intensity_range": [0.0, 1.0], "latent_shape": [2, 4, 4, 4],
            "scale_factor": scale if model_scale is None else model_scale, "autoencoder_sha256": sha}
    model = tmp_path / "model.safetensors"
    save_final(model, build_model(UNET, channels=2).state_dict(), {"model": UNET, "scheduler": SCHEDULER,
                                                                   "data": data}, 1)
    return model, ae


SAMPLE = {"n": 2, "batch": 2, "jobs": 1, "base_seed": 7, "ddim_steps": 4, "device": "cpu"}


def test_latent_sampling_decodes_with_the_scale_factor(tmp_path):
    model_file, ae_file = _files(tmp_path)
    out = tmp_path / "part-000.h5"
    run_sample(SAMPLE, model_file, "ddim", 0, out, tmp_path / "nifti", autoencoder=ae_file)
    with h5py.File(out) as f:
        volumes = f["images"][()]
    assert volumes.shape == (2, 1, *SHAPE) and volumes.min() >= 0 and volumes.max() <= 1
    # the same by hand: unclipped latents, then decoded with the factor undone
    model, config = load_final(model_file)
    latents = denoise(model, make_scheduler(config, "ddim", 4), [7, 8], (4, 4, 4), torch.device("cpu"),
                      channels=2, clip=False)
    assert float(latents.abs().max()) > 1.0  # not clipped to [0, 1]
    torch.manual_seed(0)
    decoder = build_autoencoder(TINY_AUTOENCODER).eval()
    assert np.allclose(volumes, decode_latents(decoder, latents, SCALE, SHAPE).numpy(), atol=1e-5)
    assert not np.allclose(volumes, decode_latents(decoder, latents, 1.0, SHAPE).numpy(), atol=1e-3)
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 2


def test_another_autoencoder_or_scale_is_refused(tmp_path):
    model_file, ae_file = _files(tmp_path / "a", other_autoencoder=True)
    with pytest.raises(CheckpointError, match=r"autoencoder\.safetensors.*is not the autoencoder.*model\.safetensors"):
        run_sample(SAMPLE, model_file, "ddim", 0, tmp_path / "p.h5", tmp_path / "n", autoencoder=ae_file)
    model_file, ae_file = _files(tmp_path / "b", model_scale=1.0)
    with pytest.raises(CheckpointError, match="scale factor 2.5 .* differs from the 1.0"):
        run_sample(SAMPLE, model_file, "ddim", 0, tmp_path / "p.h5", tmp_path / "n", autoencoder=ae_file)
    with pytest.raises(BadInputError, match="needs its autoencoder"):
        run_sample(SAMPLE, model_file, "ddim", 0, tmp_path / "p.h5", tmp_path / "n")
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.slow  # about 25 s: two trainings, encoding and sampling
def test_the_latent_chain_in_one_process(tmp_path):
    """helpers.latent_chain (which test_gpu.py runs on a GPU) on the CPU: trained autoencoder -> latents ->
    latent UNet -> decoded samples on the training grid."""
    from helpers import latent_chain

    autoencoder, latent, part = latent_chain(tmp_path, gpus=0)
    assert autoencoder["kind"] == "autoencoder" and latent["kind"] == "diffusion" and latent["steps"] == 3
    with h5py.File(part) as f:
        volumes = f["images"][()]
    assert volumes.shape == (2, 1, *SHAPE) and np.isfinite(volumes).all() and volumes.max() > 0
