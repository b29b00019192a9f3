"""match_training: synthetic volume i asks for the covariates of training volume i (the utility stage's plan)."""

from __future__ import annotations

import pytest

from brainddpm.errors import ConfigError
from brainddpm.models.conditioning import fit_encoding
from brainddpm.sampling.plan import build_plan

COND = {"covariates": [{"name": "diagnosis", "type": "categorical"}, {"name": "age", "type": "continuous"}],
        "drop_prob": 0.15, "missing": "drop"}
TRAIN = [{"diagnosis": "patient", "age": 70.0}, {"diagnosis": "control", "age": 30.0},
         {"diagnosis": "control", "age": None}]
VAL = [{"diagnosis": "patient", "age": 55.0}]


def test_match_training_takes_training_volume_i_cycling_and_never_the_validation_split():
    enc = fit_encoding(COND, TRAIN)
    doc = build_plan({"n": 5, "conditions": "match_training", "guidance_scale": 2.0}, enc, VAL, TRAIN)
    assert doc["mode"] == "match_training"
    assert [v["covariates"] for v in doc["volumes"]] == [TRAIN[i % 3] for i in range(5)]
    assert {v["stratum"] for v in doc["volumes"]} == {"match_training"}
    assert [v["index"] for v in doc["volumes"]] == list(range(5))


def test_match_training_without_the_training_split_is_an_error():
    enc = fit_encoding(COND, TRAIN)
    with pytest.raises(ConfigError, match="'sample.conditions': match_training"):
        build_plan({"n": 2, "conditions": "match_training"}, enc, VAL)
