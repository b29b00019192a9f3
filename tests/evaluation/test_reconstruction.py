"""The autoencoder's reconstruction of the validation split: per-volume scores along the sampling path, means
with subject-level CIs."""

from __future__ import annotations

import json

import numpy as np
import torch

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.evaluation.bootstrap import subject_means_ci, subject_resamples
from brainddpm.evaluation.reconstruction import run_reconstruction
from brainddpm.models.autoencoder import build_autoencoder, decode_latents, encode_volumes
from brainddpm.models.final import save_final
from helpers import TINY_AUTOENCODER, make_shards


def test_reconstruction_scores_the_sampling_path(tmp_path):
    torch.manual_seed(0)
    ae = build_autoencoder(TINY_AUTOENCODER).eval()
    save_final(tmp_path / "autoencoder.safetensors", ae.state_dict(),
               {"kind": "autoencoder", "autoencoder": TINY_AUTOENCODER, "data": {"target_shape": [16, 16, 16]},
                "scale_factor": 1.7}, 1)
    val = make_shards(tmp_path / "val", n=5)
    doc = run_reconstruction(tmp_path / "autoencoder.safetensors", val, None, seed=0, n_boot=200,
                             out=tmp_path / "reconstruction.json", png=tmp_path / "reconstruction.png",
                             device_name="cpu")
    assert json.loads((tmp_path / "reconstruction.json").read_text())["n"] == 5
    assert (tmp_path / "reconstruction.png").stat().st_size > 1000
    volumes, _, _ = read_volumes(split_files(val))
    x = torch.from_numpy(volumes[:1])
    recon = decode_latents(ae, encode_volumes(ae, x, TINY_AUTOENCODER) * 1.7, 1.7, (16, 16, 16)).numpy()
    mse = float(((recon - volumes[:1]) ** 2).mean())
    assert np.isclose(doc["per_volume"]["psnr"][0], 10 * np.log10(1 / mse), atol=1e-4)
    assert np.isclose(doc["per_volume"]["mae"][0], float(np.abs(recon - volumes[:1]).mean()), atol=1e-6)
    for entry in doc["metrics"].values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_subject_resamples_keep_sessions_together():
    subjects = ["a", "a", "b", "c", "c", "c"]
    for draw in subject_resamples(subjects, 30, seed=3):
        picked = [subjects[i] for i in draw]
        assert all(picked.count(s) % subjects.count(s) == 0 for s in set(picked))
    ci = subject_means_ci({"x": np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])}, subjects, 500, seed=0)["x"]
    assert 1.0 <= ci["ci_low"] < ci["value"] < ci["ci_high"] <= 3.0
