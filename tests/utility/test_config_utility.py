"""The utility section of the config: its defaults, and the startup checks that name the key."""

from __future__ import annotations

import re

import pytest
import yaml

from brainddpm.config import deep_merge, load_config, validate_config
from brainddpm.errors import ConfigError
from helpers import ROOT, base_config
from test_workflow import snakemake

COND = {"covariates": [{"name": "diagnosis", "type": "categorical"}, {"name": "age", "type": "continuous"}]}
STRATA = [{"diagnosis": "patient", "n": 2}, {"diagnosis": "control", "n": 2}]


def _utility(**over) -> dict:
    """A base config with a conditional model, a strata plan and utility enabled, then `over` laid on it."""
    cfg = deep_merge(base_config(), {"condition": COND, "sample": {"n": 4, "batch": 2, "jobs": 2, "conditions": STRATA},
                                     "utility": {"enabled": True, "target": "diagnosis"}})
    return deep_merge(cfg, over)


def test_config_yaml_holds_the_schemas_defaults():
    """The schema holds the utility section's defaults; config/config.yaml repeats them, key for key."""
    assert yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["utility"] == \
        validate_config({"utility": {}}, partial=True)["utility"]


def test_the_utility_demo_config_is_valid():
    cfg = load_config([ROOT / "config" / f for f in ("config.yaml", "demo.yaml", "demo-utility.yaml")])
    assert cfg["utility"]["enabled"] and cfg["demo"]["patient_fraction"] == 0.2
    validate_config(_utility())
    validate_config(_utility(sample={"conditions": "match_training"}))


@pytest.mark.parametrize("over,key", [
    ({"sample": {"conditions": "match_validation"}}, "sample.conditions"),
    ({"utility": {"target": "sex"}}, "utility.target"),
    ({"condition": {"covariates": []}}, "utility.target"),
    ({"utility": {"target": None}}, "utility.target"),
    ({"utility": {"target_type": "continuous"}}, "utility.target_type"),
    ({"utility": {"sampler": "ddim"}}, "utility.sampler"),
    ({"utility": {"cnn": {"strides": [2, 2]}}}, "utility.cnn.strides"),
    ({"utility": {"ratio": [1]}}, "utility.ratio"),
    ({"utility": {"repeats": 0}}, "utility.repeats"),
], ids=["match_validation", "not-a-covariate", "unconditional", "no-target", "type", "sampler", "strides",
        "unknown", "repeats"])
def test_utility_mistakes_name_the_key(over, key):
    cfg = _utility(**over)
    if over.get("sample", {}).get("conditions") == "match_validation":
        cfg["sample"]["conditions"] = "match_validation"  # deep_merge would keep the strata list otherwise
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}")):
        validate_config(cfg)


def test_disabled_utility_checks_nothing():
    validate_config(_utility(utility={"enabled": False, "target": "sex"}, sample={"conditions": "match_validation"}))


def test_the_workflow_stops_at_startup_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sample": {"conditions": "match_validation", "n": 16}}))
    proc = snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml", "config/demo-utility.yaml",
                     str(bad), check=False)
    assert proc.returncode != 0 and "config key 'sample.conditions'" in proc.stdout + proc.stderr
    bad.write_text(yaml.safe_dump({"utility": {"target": "sex"}}))
    proc = snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml", "config/demo-utility.yaml",
                     str(bad), check=False)
    assert proc.returncode != 0 and "config key 'utility.target'" in proc.stdout + proc.stderr


def test_dry_run_lists_the_utility_rules_only_when_enabled(tmp_path):
    """The utility demo plans a part per arm and repeat, a two-sample test per sampler and the gather step; the
    plain demo plans none of them (and so none of its rules changes)."""
    from test_workflow import _planned_jobs

    over = tmp_path / "results.yaml"  # a fresh results folder: the dry run plans everything
    over.write_text(yaml.safe_dump({"results": str(tmp_path / "results")}))
    jobs = _planned_jobs(snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml",
                                   "config/demo-utility.yaml", str(over)))
    cfg = yaml.safe_load((ROOT / "config" / "demo-utility.yaml").read_text())["utility"]
    arms = 4 + len(cfg["ratios"])  # real, synthetic, mix-<r>..., augmented, oversampled (diagnosis is categorical)
    assert jobs["utility_part"] == arms * cfg["repeats"] and jobs["two_sample"] == 1 and jobs["utility_gather"] == 1
    jobs = _planned_jobs(snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml", str(over)))
    assert not {"utility_part", "two_sample", "utility_gather"} & set(jobs) and jobs["report"] == 1
