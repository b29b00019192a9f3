"""What differs between the models a run trains (training/tasks.py): the kinds there are."""

from __future__ import annotations

import pytest

from brainddpm.errors import ConfigError
from brainddpm.training.launch import run_training
from brainddpm.training.loop import train
from brainddpm.training.tasks import KINDS
from helpers import tiny_config


def test_an_unknown_kind_is_refused_by_name_before_anything_is_read_or_submitted(tmp_path):
    # the shards folder does not exist: without the check, the run would fail later on the missing index
    # (a BadInputError), or silently train a diffusion model on real shards
    assert KINDS == ("diffusion", "autoencoder")
    for run in (train, run_training):
        with pytest.raises(ConfigError, match=r"training kind 'vae': unknown; brainddpm trains diffusion or "
                                              r"autoencoder models"):
            run(tiny_config(), tmp_path / "no-shards", tmp_path / "run", kind="vae")
    assert not (tmp_path / "run").exists()
