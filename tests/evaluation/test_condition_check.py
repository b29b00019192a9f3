"""The conditioning check (evaluation/condition_check.py) on volumes whose ventricles grow with age by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainddpm.evaluation.condition_check import features, run_condition_check, ventricle_fraction
from brainddpm.models.conditioning import fit_encoding
from helpers import COND, SHAPE, aging_brains, write_split


def test_ventricle_fraction_grows_with_the_dark_core():
    young, old = aging_brains([25, 80], seed=0)[:, 0]
    assert 0 < ventricle_fraction(young) < ventricle_fraction(old)
    assert np.isnan(ventricle_fraction(np.zeros(SHAPE)))
    morpho = features(aging_brains([30, 60], seed=1))
    assert morpho.shape == (2, 3) and morpho[1, 2] > morpho[0, 2]


@pytest.fixture(scope="module")
def real_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    train_cov = [{"age": float(a), "sex": str(rng.choice(["F", "M"]))} for a in rng.uniform(20, 85, 40)]
    val_cov = [{"age": float(a), "sex": "F"} for a in np.linspace(22, 84, 10)]
    write_split(root / "train", aging_brains([c["age"] for c in train_cov], 1), train_cov)
    write_split(root / "val", aging_brains([c["age"] for c in val_cov], 2), val_cov, split="val")
    return root, fit_encoding(COND, train_cov)


def _samples(path, encoding, shown_ages, requested_ages):
    """A 'sample part' of volumes that look `shown_ages` old but say they were asked for `requested_ages`."""
    import h5py

    vols = aging_brains(shown_ages, seed=3)
    cov = [{"age": float(a), "sex": "FM"[i % 2]} for i, a in enumerate(requested_ages)]
    strata = [f"age={a:g}" for a in requested_ages]
    parts = write_split(path, vols, cov, stratum=strata)
    with h5py.File(parts[0], "a") as f:
        f.attrs["encoding"] = json.dumps(encoding.to_dict())
    return parts


def test_a_generator_that_follows_the_condition_shows_the_age_effect(real_splits, tmp_path):
    root, encoding = real_splits
    ages = [25.0] * 8 + [80.0] * 8
    doc = run_condition_check(300, 0, root / "train", root / "val", _samples(tmp_path / "s", encoding, ages, ages),
                              tmp_path / "conditioning.json")
    assert json.loads((tmp_path / "conditioning.json").read_text()) == doc
    diff = doc["ventricle_effect"]["age"]["difference"]
    assert (diff["high_stratum"], diff["low_stratum"]) == ("age=80", "age=25")
    assert diff["value"] > 0 and diff["ci_low"] > 0 and diff["excludes_zero"]
    assert doc["ventricle_effect"]["age"]["slope_per_unit"]["ci_low"] > 0
    assert doc["real_ventricle_effect"]["age"]["slope_per_unit"]["ci_low"] > 0
    # the age predictor, fitted on training volumes only, reads age from validation and 'synthetic' volumes
    assert doc["real_validation"]["age"]["value"] < 12 and doc["synthetic"]["age"]["value"] < 12
    assert [s["stratum"] for s in doc["strata"]] == ["age=25", "age=80"]
    assert doc["strata"][1]["scores"]["age"]["predicted_mean"] > doc["strata"][0]["scores"]["age"]["predicted_mean"]
    assert doc["strata"][0]["n_real_matching"] >= 1 and "mmd" in doc["strata"][0]
    # sex has no effect on these images: accuracy is reported with what guessing the majority gives
    assert doc["synthetic"]["sex"]["kind"] == "accuracy" and 0 <= doc["synthetic"]["sex"]["majority_rate"] <= 1


def test_a_generator_that_ignores_the_condition_shows_none(real_splits, tmp_path):
    root, encoding = real_splits
    requested = [25.0] * 8 + [80.0] * 8
    shown = [52.0] * 16  # every volume looks middle-aged, whatever was asked
    samples = _samples(tmp_path / "s", encoding, shown, requested)
    doc = run_condition_check(300, 0, root / "train", root / "val", samples,
                              tmp_path / "conditioning.json")
    diff = doc["ventricle_effect"]["age"]["difference"]
    assert not diff["excludes_zero"] and diff["ci_low"] <= 0 <= diff["ci_high"]
    assert doc["synthetic"]["age"]["value"] > 15  # predicted ~52 where 25 or 80 was asked
