"""The final model file: written with its config, rebuilt from the file alone, refused when missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from brainddpm import __version__
from brainddpm.errors import CheckpointError
from brainddpm.models.diffusion import build_model
from brainddpm.models.final import load_final, save_final

TINY = {"channels": [8, 8, 8], "attention_levels": [False, False, True], "num_res_blocks": 1,
        "num_head_channels": 8, "norm_num_groups": 8, "use_flash_attention": False}


def test_final_model_rebuilds_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    net = build_model(TINY)
    config = {"model": TINY, "scheduler": {"num_train_timesteps": 10, "schedule": "linear_beta",
                                           "beta_start": 1e-4, "beta_end": 0.02},
              "data": {"target_shape": [16, 16, 16], "affine": np.eye(4).tolist(), "intensity_range": [0, 1]}}
    save_final(tmp_path / "model.safetensors", net.state_dict(), config, step=7)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == config and meta["code_version"] == __version__ and meta["step"] == "7"
    model, loaded = load_final(tmp_path / "model.safetensors")
    assert not model.training and loaded["step"] == 7 and loaded["data"] == config["data"]
    x, t = torch.rand(1, 1, 16, 16, 16), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(model(x, timesteps=t), net.eval()(x, timesteps=t))
    with pytest.raises(CheckpointError, match="not found"):
        load_final(tmp_path / "missing.safetensors")
