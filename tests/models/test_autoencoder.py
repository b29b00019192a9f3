"""The autoencoder (models/autoencoder.py): shapes, padding, the codec around MONAI's AutoencoderKL, its file."""

import pytest
import torch

from brainddpm.errors import CheckpointError
from brainddpm.models.autoencoder import (
    build_autoencoder,
    compression,
    decode_latents,
    encode_volumes,
    latent_shape,
    load_autoencoder,
    padded_shape,
)
from brainddpm.models.diffusion import build_model
from brainddpm.models.final import load_final, save_final
from helpers import TINY_AUTOENCODER

TINY = {"channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}


def test_latent_shape_pads_to_the_multiple_and_round_trip_keeps_the_image_shape():
    ae_cfg = {**TINY_AUTOENCODER, "pad_multiple": 8}
    ae = build_autoencoder(ae_cfg).eval()
    shape = (13, 18, 9)  # no axis a multiple of 4 or 8: every axis is padded
    assert compression(ae_cfg) == 4 and padded_shape(shape, 8) == (16, 24, 16)
    assert latent_shape(ae_cfg, shape) == (2, 4, 6, 4)
    x = torch.rand(2, 1, *shape)
    z = encode_volumes(ae, x, ae_cfg)
    assert tuple(z.shape) == (2, *latent_shape(ae_cfg, shape))
    y = decode_latents(ae, z * 3.0, 3.0, shape)
    assert tuple(y.shape) == (2, 1, *shape) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_decoding_undoes_the_scale_factor():
    ae = build_autoencoder(TINY_AUTOENCODER).eval()
    z = torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        expected = ae.decode(z)[:, :, :16, :16, :16].clamp(0, 1)
    assert torch.allclose(decode_latents(ae, z * 2.5, 2.5, (16, 16, 16)), expected, atol=1e-5)
    ignored = decode_latents(ae, z * 2.5, 1.0, (16, 16, 16))  # what a decoder that forgot the factor gives
    assert float((ignored - expected).abs().max()) > 0.1


def test_sliding_window_decoding_covers_the_volume():
    torch.manual_seed(0)
    ae = build_autoencoder(TINY_AUTOENCODER).eval()
    z = torch.randn(1, 2, 6, 4, 6)
    whole = decode_latents(ae, z, 1.0, (24, 16, 24))
    one_window = decode_latents(ae, z, 1.0, (24, 16, 24), {"roi": [6, 4, 6], "overlap": 0.25, "sw_batch_size": 1})
    assert torch.allclose(one_window, whole, atol=1e-5)  # a window as large as the latent is the whole decode
    windows = decode_latents(ae, z, 1.0, (24, 16, 24), {"roi": [4, 4, 4], "overlap": 0.5, "sw_batch_size": 2})
    assert windows.shape == whole.shape and float(windows.std()) > 0.1 * float(whole.std())
    # windows see less context near their edges, and GroupNorm normalises over a window, not the volume: the
    # blend differs from the whole decode, yet follows it (an unrelated decode does not)
    other = decode_latents(ae, torch.randn(1, 2, 6, 4, 6), 1.0, (24, 16, 24))
    assert torch.corrcoef(torch.stack([windows.flatten(), whole.flatten()]))[0, 1] > 0.6
    assert torch.corrcoef(torch.stack([other.flatten(), whole.flatten()]))[0, 1] < 0.6


def _autoencoder_file(path, scale=2.0):
    ae = build_autoencoder(TINY_AUTOENCODER)
    save_final(path, ae.state_dict(), {"kind": "autoencoder", "autoencoder": TINY_AUTOENCODER,
                                       "data": {"target_shape": [16, 16, 16]}, "scale_factor": scale}, 3)
    return ae


def test_autoencoder_file_round_trip_and_refusals(tmp_path):
    ae = _autoencoder_file(tmp_path / "autoencoder.safetensors")
    loaded, config = load_autoencoder(tmp_path / "autoencoder.safetensors")
    assert config["scale_factor"] == 2.0 and len(config["sha256"]) == 64
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="is an autoencoder, not a diffusion model"):
        load_final(tmp_path / "autoencoder.safetensors")
    save_final(tmp_path / "model.safetensors", build_model(TINY).state_dict(),
               {"model": TINY, "scheduler": {}, "data": {"target_shape": [16, 16, 16]}}, 1)
    with pytest.raises(CheckpointError, match="not an autoencoder file"):
        load_autoencoder(tmp_path / "model.safetensors")
