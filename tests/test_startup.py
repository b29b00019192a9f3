"""Startup checks on real paths: a site's mistakes are configuration errors before the first job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainddpm.config import validate_config
from brainddpm.errors import ConfigError
from brainddpm.startup import (
    ACCOUNT_VARIABLE,
    check_datasets,
    check_launch_site,
    check_profile_account,
    check_profile_fits,
    check_site,
    check_training_gpus,
    profile_resources,
    resolve_account,
    submits_to_slurm,
    train_submission,
)
from helpers import ROOT, base_config, bids_dataset, brain_volume, write_nifti


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
    assert line.startswith("rule train submits one SLURM job: 2 node(s) x 4 GPU(s)")
    assert "qos normal" in line and "1440 min" in line and "account p" in line
    latent = train_submission({**launch, "nodes": 2, "gpus_per_node": 4}, latent=True)  # the same job, twice
    assert latent.startswith("rules train_autoencoder and train each submit one SLURM job: 2 node(s) x 4 GPU(s)")


def test_a_flat_folder_as_root_suggests_a_glob(tmp_path):
    """A folder of NIfTI files is no BIDS root: said at startup in plain words, with the glob that finds them."""
    def refused(root: Path) -> str:
        with pytest.raises(ConfigError) as error:
            check_datasets(base_config(datasets=[{"name": "flat", "root": str(root)}]))
        return str(error.value)

    for name in ("a.nii.gz", "b.nii.gz"):
        write_nifti(tmp_path / "flat" / name, brain_volume(0, (4, 4, 4)))
    message = refused(tmp_path / "flat")
    assert message.startswith(f"config key 'datasets[0].root' (dataset flat): {tmp_path / 'flat'} holds no BIDS "
                              "images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]), but 2 NIfTI file(s) directly inside")
    assert f'write glob: "{tmp_path / "flat"}/*.nii.gz" instead of root:' in message
    write_nifti(tmp_path / "nested" / "site1" / "c.nii", brain_volume(0, (4, 4, 4)))
    assert f'glob: "{tmp_path / "nested"}/**/*.nii" instead' in refused(tmp_path / "nested")
    (tmp_path / "empty").mkdir()
    assert refused(tmp_path / "empty").endswith("holds no BIDS images (sub-*/[ses-*/]anat/*_T1w.nii[.gz]), and no "
                                                "NIfTI file at all")
    bids_dataset(tmp_path / "bids", 1)  # sub-00/ses-1/anat/...: found, and sub-00/anat/... too
    write_nifti(tmp_path / "plain" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", brain_volume(0, (4, 4, 4)))
    check_datasets(base_config(datasets=[{"name": "b", "root": str(tmp_path / "bids")},
                                         {"name": "p", "root": str(tmp_path / "plain")}]))


LEONARDO_LIKE = {"*": {"slurm_account": "$BRAINDDPM_SLURM_ACCOUNT", "slurm_partition": "lrd_all_serial"},
                 "sample_part": {"slurm_partition": "boost_usr_prod", "gres": "gpu:1"},
                 "train": {"slurm_partition": "boost_usr_prod", "runtime": 1440, "cpus_per_task": 1}}


def test_what_the_profile_asks_of_slurm_is_read_from_snakemakes_resource_settings(monkeypatch):
    """Snakemake's own Resource objects, as a profile leaves them: the text, with $VARs expanded as Snakemake
    expands them for a job (an unset one stays)."""
    from types import SimpleNamespace

    from snakemake.resources import Resource, Resources

    def settings():
        default = Resources.from_mapping({"mem_mb": 4000})
        default["slurm_account"] = Resource.from_cli_expression("slurm_account", "$BRAINDDPM_SLURM_ACCOUNT")
        rule = {"runtime": Resource.from_cli_expression("runtime", "30 * attempt")}
        return SimpleNamespace(default_resources=default, overwrite_resources={"shard": rule})

    monkeypatch.delenv(ACCOUNT_VARIABLE, raising=False)
    got = profile_resources(settings())
    assert got == {"*": {"mem_mb": 4000, "slurm_account": "$BRAINDDPM_SLURM_ACCOUNT"},
                   "shard": {"runtime": "30 * attempt"}}
    monkeypatch.setenv(ACCOUNT_VARIABLE, "proj")
    assert profile_resources(settings())["*"]["slurm_account"] == "proj"
    assert profile_resources(SimpleNamespace(default_resources=None, overwrite_resources={})) == {"*": {}}
    assert submits_to_slurm(got) and not submits_to_slurm({"*": {"mem_mb": 4000}})


def test_a_profile_that_reads_an_unset_account_is_refused():
    with pytest.raises(ConfigError, match=r"^profile key 'default-resources: slurm_account': "
                                          r"\$BRAINDDPM_SLURM_ACCOUNT is not set, so every job would ask SLURM for "
                                          r"the account '\$BRAINDDPM_SLURM_ACCOUNT'; "
                                          r"`export BRAINDDPM_SLURM_ACCOUNT=<your project>`"):
        check_profile_account(LEONARDO_LIKE)
    with pytest.raises(ConfigError, match=r"'set-resources: train: slurm_account': .* the account ''"):
        check_profile_account({"*": {}, "train": {"slurm_account": ""}})  # set, but empty
    check_profile_account({**LEONARDO_LIKE, "*": {"slurm_account": "proj"}})
    check_profile_account({"*": {"slurm_partition": "debug"}})  # a cluster without accounts (ci-slurm)


def test_the_demo_preset_on_leonardos_booster_is_refused_with_what_to_use_instead():
    launch = base_config(launch={"executor": "inprocess", "gpus_per_node": 0})["launch"]
    with pytest.raises(ConfigError, match=r"^config key 'launch.executor': inprocess under a profile for LEONARDO's "
                                          r"Booster \(boost_usr_prod\): `train` would run inside a CPU-only SLURM "
                                          r"job \(1440 min, no GPU\) .*--profile profiles/local"):
        check_profile_fits(launch, LEONARDO_LIKE)
    with pytest.raises(ConfigError, match="'launch.executor': local under"):  # a GPU preset such as gpu-smoke
        check_profile_fits({**launch, "executor": "local", "gpus_per_node": 1}, LEONARDO_LIKE)
    check_profile_fits({**launch, "executor": "slurm"}, LEONARDO_LIKE)  # training in its own submitit job
    check_profile_fits(launch, {"*": {"slurm_partition": "debug"}})  # the test cluster runs the demo in its jobs
    check_profile_fits(launch, {"*": {}})  # profiles/local


def test_training_here_needs_the_gpus_it_asks_for(tmp_path):
    local = base_config()["launch"]  # the reference config: executor local, one GPU
    with pytest.raises(ConfigError, match=r"^config key 'launch.gpus_per_node': 1 GPU\(s\) requested for training "
                                          r"on this machine \(launch.executor: local\), but it has 0; on a CPU layer "
                                          r"config/cpu.yaml"):
        check_training_gpus(local, visible=0)
    check_training_gpus(local, visible=1)
    check_training_gpus({**local, "executor": "inprocess", "gpus_per_node": 0}, visible=0)  # the demo
    check_training_gpus({**local, "executor": "slurm", "account": "p"}, visible=0)  # trains elsewhere
    bids_dataset(tmp_path / "bids", 1)
    cfg = base_config(datasets=[{"name": "b", "root": str(tmp_path / "bids")}],
                      launch={"gpus_per_node": 64})  # more than any machine here
    with pytest.raises(ConfigError, match="'launch.gpus_per_node': 64 GPU"):
        check_site(cfg, {"*": {}})
    check_site(cfg, {"*": {"slurm_partition": "debug"}})  # `train` is a job of the cluster profile: SLURM's GPUs
    check_site(cfg, {"*": {}}, main_process=False)  # a job's own Snakemake, on the node that runs it


def _dry_run(*configs, profile="local", env=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", f"profiles/{profile}",
                           "--configfile", "config/config.yaml", *map(str, configs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_cpu_preset_plans_ones_own_data_and_the_default_config_says_it_needs_a_gpu(tmp_path):
    """config/cpu.yaml over one's own data: the demo's sizes, no demo cohort, outputs in one's own results folder.
    Without it, on a machine without a GPU, the reference config stops at startup naming the key."""
    import torch

    bids_dataset(tmp_path / "bids", 2)
    mine = tmp_path / "my.yaml"
    mine.write_text(yaml.safe_dump({"results": str(tmp_path / "results"),
                                    "datasets": [{"name": "mine", "root": str(tmp_path / "bids")}]}))
    proc = _dry_run("config/cpu.yaml", mine)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "demo_cohort" not in out and "results/demo" not in out and "resources/demo" not in out
    assert f"{tmp_path}/results/train/cpu/model.safetensors" in out and "wildcards: sampler=ddim" in out
    cpu = yaml.safe_load((ROOT / "config" / "cpu.yaml").read_text())
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for section in ("model", "data", "launch"):
        assert {k: v for k, v in demo[section].items() if k != "volumes_per_shard"} == cpu[section], section
    assert not {"demo", "datasets", "results"} & set(cpu)
    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU: the reference config's training fits it")
    proc = _dry_run(mine)
    assert proc.returncode != 0
    assert re.search(r"invalid configuration: config key 'launch.gpus_per_node': 1 GPU\(s\) requested for training "
                     r"on this machine \(launch.executor: local\), but it has 0", proc.stdout + proc.stderr)


def test_the_rflow_demo_plans_its_sampler_the_mask_rule_and_the_realism_probe(tmp_path):
    """config/demo.yaml (rectified flow): the rflow sampler's parts (the rule's wildcard takes it), the mask rule
    before sampling and the realism probe per sampler; its DDIM arm (demo-ddim) plans ddim; an rflow model with
    the ddim sampler stops at startup."""
    proc = _dry_run("config/demo.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "wildcards: sampler=rflow, part=000" in out and "rule mask_rule:" in out
    assert "results/demo/eval/demo/rflow/realism.json" in out
    proc = _dry_run("config/demo.yaml", "config/demo-ddim.yaml")
    assert proc.returncode == 0 and "results/demo-ddim/eval/demo-ddim/ddim/realism.json" in proc.stdout
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"sample": {"samplers": ["ddim"]}}))
    proc = _dry_run("config/demo.yaml", wrong)
    assert proc.returncode != 0 and "sample.samplers': ddim cannot sample a model trained with scheduler.kind: " \
                                   "rflow" in proc.stdout + proc.stderr


def test_a_reference_mask_pattern_is_no_wildcard_of_the_workflow(tmp_path):
    """A dataset's reference_mask holds "{subject}" and "{session}": the dry run plans the data stage (the
    rules' params are functions, so Snakemake does not take them for wildcards)."""
    paths = bids_dataset(tmp_path / "bids", 2)
    for p in paths:
        write_nifti(tmp_path / "truth" / p.name.replace("_T1w", "_mask"), (brain_volume(0) > 0).astype("uint8"))
    mine = tmp_path / "my.yaml"
    mine.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "datasets": [
        {"name": "mine", "root": str(tmp_path / "bids"),
         "reference_mask": str(tmp_path / "truth" / "{subject}_{session}_mask.nii.gz")}]}))
    proc = _dry_run("config/cpu.yaml", mine)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rule qc:" in proc.stdout
