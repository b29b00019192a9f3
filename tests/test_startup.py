"""Startup checks on real paths: a site's mistakes are configuration errors before the first job."""

from __future__ import annotations

import pytest
from helpers import base_config, bids_dataset

from brainddpm.config import validate_config
from brainddpm.errors import ConfigError
from brainddpm.startup import ACCOUNT_VARIABLE, check_datasets, check_launch_site, resolve_account, train_submission


def test_dataset_paths_must_exist(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    (tmp_path / "p.tsv").write_text("participant_id\tage\nsub-00\t50\n")
    ok = {"name": "a", "root": str(tmp_path / "a"), "participants": str(tmp_path / "p.tsv")}
    check_datasets(base_config(datasets=[ok]))
    for bad, message in (
        ({"name": "x", "root": str(tmp_path / "typo")}, r"'datasets\[1\] \(x\).root': .*typo does not exist"),
        ({"name": "x", "root": str(tmp_path / "p.tsv")}, r"'datasets\[1\] \(x\).root': .*p.tsv is not a folder"),
        ({"name": "x", "glob": str(tmp_path / "*.nii.gz")}, r"'datasets\[1\] \(x\).glob': .*matches no file"),
        ({**ok, "name": "x", "participants": str(tmp_path / "q.tsv")},
         r"'datasets\[1\] \(x\).participants': .*q.tsv does not exist"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_datasets(base_config(datasets=[ok, bad]))


def test_the_demo_cohort_is_written_later_and_an_empty_list_is_an_error(tmp_path):
    demo = {"enabled": True, "n": 4, "seed": 0, "out": str(tmp_path / "demo")}
    pending = {"name": "d", "root": str(tmp_path / "demo" / "siteA"),
               "participants": str(tmp_path / "demo" / "participants.tsv")}
    check_datasets(base_config(demo=demo, datasets=[pending]))  # its rule writes it
    with pytest.raises(ConfigError, match="does not exist"):
        check_datasets(base_config(demo={**demo, "enabled": False}, datasets=[pending]))
    cfg = base_config(demo=demo)
    cfg["datasets"] = []
    with pytest.raises(ConfigError, match=r"'datasets': empty; the demo cohort is written to .*but no dataset"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"'datasets': empty; list your datasets"):  # the manifest job's part
        validate_config({"datasets": [], "data": cfg["data"]}, partial=True)


def test_a_slurm_run_needs_an_account_from_the_config_or_the_environment():
    launch = base_config(launch={"executor": "slurm", "account": None})["launch"]
    with pytest.raises(ConfigError, match=f"'launch.account': not set, and \\${ACCOUNT_VARIABLE} is empty"):
        check_launch_site(launch, environ={})
    check_launch_site(launch, environ={ACCOUNT_VARIABLE: "proj"})
    assert resolve_account(launch, environ={ACCOUNT_VARIABLE: "proj"})["account"] == "proj"
    assert resolve_account({**launch, "account": "mine"}, environ={ACCOUNT_VARIABLE: "proj"})["account"] == "mine"
    check_launch_site({**launch, "executor": "local"}, environ={})  # not a SLURM run: nothing to check
    check_launch_site({**launch, "account": False}, environ={})  # said outright: a cluster without accounts
    assert resolve_account({**launch, "account": False}, environ={ACCOUNT_VARIABLE: "proj"})["account"] is False


def test_a_leonardo_qos_must_hold_the_time_limit():
    launch = {**base_config()["launch"], "executor": "slurm", "account": "p", "partition": "boost_usr_prod"}
    check_launch_site({**launch, "qos": "normal", "time_min": 1440})
    with pytest.raises(ConfigError, match=r"'launch.time_min': 1440 min is longer than launch.qos "
                                          r"boost_qos_dbg's limit of 30 min on boost_usr_prod"):
        check_launch_site({**launch, "qos": "boost_qos_dbg", "time_min": 1440})
    check_launch_site({**launch, "qos": "boost_qos_dbg", "time_min": 25})
    check_launch_site({**launch, "partition": "gpu", "qos": "boost_qos_dbg", "time_min": 1440})  # not LEONARDO
    line = train_submission({**launch, "nodes": 2, "gpus_per_node": 4, "qos": "normal"})
    assert "2 node(s) x 4 GPU(s)" in line and "qos normal" in line and "1440 min" in line and "account p" in line
