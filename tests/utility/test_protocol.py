"""The utility protocol on a tiny task where more data helps: can it tell a helpful generator from a useless one?

The 'helpful generator' is an oracle: its sample part holds extra real volumes from the training
distribution (subjects in neither split). The useless one returns uniform noise with the same labels.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import utility_tasks as tasks
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.evaluation.bootstrap import subject_resamples
from brainddpm.utility import downstream
from brainddpm.utility.commands import add_commands, read_settings
from brainddpm.utility.protocol import gather, run_part

SETTINGS = {"target": "diagnosis", "repeats": 3, "ratios": [2], "bootstrap": 500,
            "cnn": {"channels": [4, 8], "strides": [2, 2], "steps": 60, "batch": 8, "lr": 3e-3},
            "linear": {"components": 30}}


def utility_settings(given: dict) -> dict:
    """The settings the subcommands read from --settings-json: the schema's checks and defaults."""
    return read_settings(argparse.Namespace(settings_json=json.dumps(given)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tasks.study(tmp_path_factory.mktemp("study"))


def _gathered(study, synthetic: str) -> dict:
    settings = utility_settings(SETTINGS)
    parts = [run_part(settings, study["train"], study["val"], study[synthetic], arm, repeat)
             for arm in ("real", "mix-2") for repeat in range(settings["repeats"])]
    return gather(parts, settings)


def _difference(result, model, metric="auroc"):
    return result["arms"]["mix-2"]["models"][model][metric]["difference"]


def test_a_helpful_generator_is_detected(study):
    result = _gathered(study, "oracle")
    mix = result["arms"]["mix-2"]
    assert mix["n"] == 36 and mix["counts"] == {"real": 12, "synthetic": 24} and mix["repeats"] == 3
    assert result["arms"]["real"]["n"] == 12 and result["test"] == {"split": str(study["val"]), "volumes": 40,
                                                                     "subjects": 20}
    linear = _difference(result, "linear")
    assert linear["ci"][0] > 0, linear  # real plus (oracle) synthetic beats real only, CI above 0
    assert _difference(result, "cnn")["ci"][0] > 0  # the CNN sees it too
    assert mix["synthetic"]["samplers"] == ["oracle"]
    json.dumps(result)  # JSON-serialisable as it is


def test_a_useless_generator_is_not(study):
    result = _gathered(study, "noise")
    for model in ("linear", "cnn"):
        for metric in ("auroc", "balanced_accuracy"):
            difference = _difference(result, model, metric)
            assert not difference["ci"][0] > 0, (model, metric, difference)


def test_every_arm_trains_the_same_steps_on_training_volumes_and_tests_on_the_same_set(study, monkeypatch):
    """Count the optimizer steps each arm really takes, and check that no training volume is a test volume."""
    from brainddpm.data.shards import read_volumes, split_files

    seen = []
    train = downstream.train_network

    def counting(network, loss_fn, images, targets, **kw):
        calls = []

        def loss(output, target):
            calls.append(1)
            return loss_fn(output, target)
        out = train(network, loss, images, targets, **kw)
        seen.append((len(calls), images))
        return out

    monkeypatch.setattr(downstream, "train_network", counting)
    settings = utility_settings({**SETTINGS, "models": ["cnn"], "ratios": [0.5, 2],
                                 "cnn": {**SETTINGS["cnn"], "steps": 5}})
    arms = ["real", "synthetic", "mix-0.5", "mix-2", "augmented", "oversampled"]
    parts = [run_part(settings, study["train"], study["val"], study["oracle"], arm, 0) for arm in arms]
    assert [steps for steps, _ in seen] == [5] * len(arms)
    assert {p["arm"]: p["n"] for p in parts} == {"real": 12, "synthetic": 12, "mix-0.5": 18, "mix-2": 36,
                                                 "augmented": 24, "oversampled": 12}  # balanced already
    assert all(p["test"] == parts[0]["test"] for p in parts)
    test_images, _, _ = read_volumes(split_files(study["val"]))
    test_hashes = {v.tobytes() for v in test_images}
    assert all(v.tobytes() not in test_hashes for _, images in seen for v in images)
    assert len(test_hashes) == 40


def test_oversampling_balances_the_classes(tmp_path):
    images, _ = tasks.labelled(10, seed=4)
    diagnosis = ["patient"] * 3 + ["control"] * 7
    train = tasks.write_volumes(tmp_path / "train", images, [f"t{i}" for i in range(10)], diagnosis)
    val = tasks.write_volumes(tmp_path / "val", images[:4], [f"v{i}" for i in range(4)],
                              ["patient", "control"] * 2, split="val")
    settings = utility_settings({**SETTINGS, "models": ["linear"]})
    part = run_part(settings, train, val, [], "oversampled", 0)
    assert part["n"] == 14 and part["counts"] == {"real": 10, "oversampled": 4}


def test_bootstrap_resamples_whole_subjects():
    subjects = ["a", "a", "b", "c", "c", "c"]
    for idx in subject_resamples(subjects, 50, seed=1):
        drawn = [subjects[i] for i in idx]
        for s in set(drawn):
            assert drawn.count(s) % subjects.count(s) == 0  # every session of a drawn subject, every time
        assert len({s for s in drawn}) <= 3


def test_bad_inputs_give_named_errors(study, tmp_path):
    settings = utility_settings(SETTINGS)
    with pytest.raises(BadInputError, match="no volume has the target covariate 'grade'"):
        run_part({**settings, "target": "grade"}, study["train"], study["val"], [], "real", 0)
    images, _ = tasks.labelled(4, seed=5)
    one_class = tasks.write_volumes(tmp_path / "one", images, list("abcd"), ["control"] * 4)
    with pytest.raises(BadInputError, match="one class") as err:
        run_part(settings, one_class, study["val"], [], "real", 0)
    assert str(one_class) in str(err.value)
    with pytest.raises(BadInputError, match="needs 24 synthetic volumes"):
        run_part({**settings, "ratios": [2]}, study["train"], study["val"], study["oracle"][:0] or
                 [tasks.write_volumes(tmp_path / "few.h5", images, [f"synthetic-{i}" for i in range(4)],
                                      ["control", "patient"] * 2, split=None)], "mix-2", 0)
    with pytest.raises(BadInputError, match="also in the training split"):
        run_part(settings, study["train"], study["train"], [], "real", 0)
    with pytest.raises(ConfigError, match="utility arm 'mix-7'"):
        run_part(settings, study["train"], study["val"], study["oracle"], "mix-7", 0)
    with pytest.raises(ConfigError, match="'utility.cnn.depth'"):
        utility_settings({"target": "diagnosis", "cnn": {"depth": 3}})
    with pytest.raises(ConfigError, match="'utility.target'"):
        utility_settings({})
    a = {"arm": "real", "repeat": 0, "target": "diagnosis", "steps": 1, "test": {"subjects": ["x"], "truth": ["a"]}}
    with pytest.raises(BadInputError, match="same test set"):
        gather([a, {**a, "arm": "mix-1", "test": {"subjects": ["y"], "truth": ["a"]}}], settings)


def test_commands_write_parts_and_utility_json(study, tmp_path):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    # the workflow's keys (enabled, sampler) come along with the section and are ignored
    settings = json.dumps({**SETTINGS, "models": ["linear"], "repeats": 2, "bootstrap": 50, "enabled": True,
                           "sampler": "ddim"})
    parts = []
    for arm in ("real", "mix-2"):
        for repeat in range(2):
            parts.append(tmp_path / f"{arm}-{repeat}.json")
            args = parser.parse_args(["utility-part", "--settings-json", settings, "--train", str(study["train"]),
                                      "--val", str(study["val"]), "--samples", *map(str, study["oracle"]),
                                      "--arm", arm, "--repeat", str(repeat), "--out", str(parts[-1])])
            args.func(args)
    out = tmp_path / "utility.json"
    args = parser.parse_args(["utility-gather", "--settings-json", settings, "--parts", *map(str, parts),
                              "--run", "oracle-run", "--out", str(out)])
    args.func(args)
    result = json.loads(out.read_text())
    assert list(result["arms"]) == ["real", "mix-2"] and result["repeats"] == 2 and result["bootstrap"] == 50
    assert result["generator"]["run"] == "oracle-run" and result["generator"]["samplers"] == ["oracle"]
    assert result["generator"]["files"] == [str(p) for p in study["oracle"]]
    entry = result["arms"]["mix-2"]["models"]["linear"]["balanced_accuracy"]
    assert set(entry) == {"value", "ci", "per_repeat", "difference"} and len(entry["per_repeat"]) == 2
    assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
    assert np.isclose(entry["difference"]["value"],
                      entry["value"] - result["arms"]["real"]["models"]["linear"]["balanced_accuracy"]["value"])
    assert not list(tmp_path.glob(".tmp-*"))
