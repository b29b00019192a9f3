"""The classifier two-sample test reads both ways: ~0.5 on two halves of one real set, ~1.0 on noise."""

from __future__ import annotations

import argparse
import json

import numpy as np

import utility_tasks as tasks
from brainddpm.utility.commands import add_commands
from brainddpm.utility.two_sample import two_sample_test

CNN = {"channels": [4, 8], "strides": [2, 2], "steps": 60, "batch": 8, "lr": 3e-3}


def _real(n: int, seed: int):
    images = tasks.brains(np.arange(n) % 2, seed)
    return images, [f"r{i // 2:03d}" for i in range(n)]  # two sessions per subject


def test_two_halves_of_the_real_set_are_indistinguishable():
    images, subjects = _real(96, seed=7)
    half = np.array([int(s[1:]) % 2 == 0 for s in subjects])  # split by subject
    result = two_sample_test(images[half], [s for s, h in zip(subjects, half) if h], images[~half], CNN,
                             holdout=0.5, bootstrap=300, confidence=0.95, seed=0)
    assert result["ci"][0] < 0.5 < result["ci"][1], result
    assert abs(result["accuracy"] - 0.5) < 0.2
    assert result["held_out"] == {"real_subjects": 12, "real_volumes": 24, "synthetic_volumes": 24}


def test_noise_is_told_apart(tmp_path):
    images, subjects = _real(32, seed=8)
    real = tasks.write_volumes(tmp_path / "val", images, subjects, ["control"] * 32, split="val")
    noise = np.random.default_rng(0).uniform(0, 1, size=(32, 1, *tasks.SHAPE)).astype(np.float32)
    part = tasks.write_volumes(tmp_path / "part-000.h5", noise, [f"synthetic-{i:04d}" for i in range(32)],
                               ["control"] * 32, split=None, sampler="noise")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    out = tmp_path / "two-sample.json"
    args = parser.parse_args(["two-sample", "--real", str(real), "--samples", str(part), "--out", str(out),
                              "--settings-json", json.dumps({"cnn": {**CNN, "steps": 1}, "bootstrap": 200,
                                                             "two_sample": {"steps": 60}})])
    args.func(args)
    result = json.loads(out.read_text())
    assert result["accuracy"] > 0.95 and result["ci"][0] > 0.85, result
    assert result["synthetic"]["samplers"] == ["noise"] and result["chance"] == 0.5
    assert result["steps"] == 60  # utility.two_sample.steps, not utility.cnn.steps
