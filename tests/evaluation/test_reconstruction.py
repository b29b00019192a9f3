"""The autoencoder's reconstruction of the validation split: per-volume scores along the sampling path, means
with subject-level CIs."""

from __future__ import annotations

import json

import numpy as np
import torch

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.evaluation.bootstrap import subject_means_ci, subject_resamples
from brainddpm.evaluation.reconstruction import naive_pooling, run_reconstruction
from brainddpm.evaluation.report.latent import reconstruction_markdown
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
    # the naive baselines, scored the same way, and the paired gain over pooling at the autoencoder's factor
    assert set(doc["baselines"]) == {"naive_2x", "naive_4x"} and doc["compression"] == 4
    naive = naive_pooling(volumes[0], 4)
    assert np.isclose(doc["baselines"]["naive_4x"]["per_volume"]["psnr"][0],
                      10 * np.log10(1 / float(((naive - volumes[0]) ** 2).mean())), atol=1e-4)
    gain = np.subtract(doc["per_volume"]["psnr"], doc["baselines"]["naive_4x"]["per_volume"]["psnr"])
    assert np.isclose(doc["gain_over_naive"]["metrics"]["psnr"]["value"], gain.mean())
    assert doc["numbers_per_voxel"] == {"autoencoder": TINY_AUTOENCODER["latent_channels"] / 64,
                                        "naive_2x": 1 / 8, "naive_4x": 1 / 64}
    section = reconstruction_markdown(doc)
    assert "naive 2x pooling (0.125 per voxel)" in section and "Against naive 4x pooling" in section
    verdict = section.split("The autoencoder is **")[1].split("**")[0]
    low, high = (doc["gain_over_naive"]["metrics"]["psnr"][k] for k in ("ci_low", "ci_high"))
    assert verdict == ("better than" if low > 0 else "worse than" if high < 0 else "not distinguishable from")


def test_naive_pooling_keeps_what_is_coarse_and_loses_what_is_fine():
    rng = np.random.default_rng(0)
    flat = np.full((1, 8, 12, 8), 0.3, dtype=np.float32)
    assert np.allclose(naive_pooling(flat, 4), 0.3)  # partial edge blocks too (12 is not a multiple of 8)
    smooth = np.cumsum(np.cumsum(rng.random((1, 16, 16, 16)), axis=1), axis=2).astype(np.float32)
    smooth /= smooth.max()
    errors = [float(np.abs(naive_pooling(smooth, f) - smooth).mean()) for f in (1, 2, 4)]
    assert errors[0] < 1e-6 and errors[1] < errors[2]
    assert naive_pooling(smooth, 2).shape == smooth.shape


def test_subject_resamples_keep_sessions_together():
    subjects = ["a", "a", "b", "c", "c", "c"]
    for draw in subject_resamples(subjects, 30, seed=3):
        picked = [subjects[i] for i in draw]
        assert all(picked.count(s) % subjects.count(s) == 0 for s in set(picked))
    ci = subject_means_ci({"x": np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])}, subjects, 500, seed=0)["x"]
    assert 1.0 <= ci["ci_low"] < ci["value"] < ci["ci_high"] <= 3.0
