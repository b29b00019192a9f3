"""Real Snakemake runs of the workflow on a tiny demo cohort."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def demo_overrides(tmp: Path, **extra) -> Path:
    """A config file that points the demo preset at a temporary folder and shrinks it further."""
    demo = tmp / "demo"
    over = {
        "results": str(tmp / "results"),
        "demo": {"enabled": True, "n": 10, "seed": 0, "out": str(demo)},
        "datasets": [{"name": s, "root": str(demo / s), "participants": str(demo / "participants.tsv")}
                     for s in ("siteA", "siteB", "siteC")],
        "data": {"volumes_per_shard": 4, "val_fraction": 0.5},
        **extra,
    }
    path = tmp / "overrides.yaml"
    path.write_text(yaml.safe_dump(over))
    return path


def snakemake(*args, cwd=ROOT, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_lint_is_clean():
    proc = snakemake("--lint", "--configfile", "config/config.yaml", "config/demo.yaml")
    assert "Congratulations" in proc.stdout + proc.stderr


def test_config_error_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    proc = snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml", str(bad), check=False)
    assert proc.returncode != 0
    assert "config key 'train.lr'" in proc.stdout + proc.stderr


@pytest.mark.parametrize("mistake,key", [
    ({"datasets": [{"name": "site", "root": "no/such/folder"}]}, "config key 'datasets[0] (site).root'"),
    ({"datasets": [{"name": "site", "glob": "no/such/*.nii.gz"}]}, "config key 'datasets[0] (site).glob'"),
    ({"launch": {"executor": "slurm", "account": None}}, "config key 'launch.account'"),
    ({"launch": {"executor": "slurm", "account": "p", "partition": "boost_usr_prod", "qos": "boost_qos_dbg",
                 "time_min": 1440}}, "config key 'launch.time_min'"),
], ids=["root", "glob", "account", "qos"])
def test_site_mistakes_stop_the_dry_run_naming_the_key(tmp_path, mistake, key):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(mistake))
    env_without_account = {k: v for k, v in os.environ.items() if k != "BRAINDDPM_SLURM_ACCOUNT"}
    proc = subprocess.run([*SNAKEMAKE, "-n", "--configfile", "config/config.yaml", "config/demo.yaml", str(site)],
                          cwd=ROOT, env=env_without_account, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if key in line]
    assert len(lines) == 1, proc.stdout + proc.stderr  # one line names the key (and says what to do)


SMALL = {  # the demo preset, smaller still: the whole DAG in a couple of minutes on 2 cores; a DDPM, so that two
    # samplers share the DAG (the demo's rectified flow: tests/test_startup.py's dry run, sampling's unit tests)
    "scheduler": {"num_train_timesteps": 50, "kind": "ddpm"},
    "train": {"epochs": 6, "micro_batch": 2, "checkpoint_every": 5},
    "sample": {"n": 4, "batch": 2, "jobs": 2, "samplers": ["ddpm", "ddim"], "ddim_steps": 10},
    "evaluate": {"n": 4, "bootstrap": 50, "jobs": 2},
}


def run_demo(tmp, *targets, extra=None, dry=False):
    over = demo_overrides(tmp, **SMALL) if extra is None else extra
    args = [*targets, "--profile", "profiles/local", "--cores", "2", "--configfile", "config/config.yaml",
            "config/demo.yaml", str(over)]
    return snakemake(*args, *(["-n"] if dry else []))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_demo(tmp)
    return tmp, proc


@pytest.mark.slow
def test_demo_pipeline_writes_the_report(demo_run):
    tmp, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp / "results"
    index = {s: json.loads((res / "shards" / s / "index.json").read_text()) for s in ("train", "val")}
    assert index["train"]["n_volumes"] + index["val"]["n_volumes"] == 10
    assert (tmp / "demo" / "mosaic.png").stat().st_size > 10_000
    info = json.loads((res / "train" / "demo" / "train.json").read_text())
    assert info["steps"] > 0 and info["world_size"] == 1
    for sampler in ("ddpm", "ddim"):
        assert len(list((res / "samples" / "demo" / sampler).glob(f"nifti-*/*_{sampler}.nii.gz"))) == 4
        metrics = json.loads((res / "eval" / "demo" / sampler / "metrics.json").read_text())["metrics"]
        assert metrics["mmd_monai_generative"]["n_real"] == min(4, index["val"]["n_volumes"])
    report = res / "report"
    for name in ("report.md", "metrics.md", "metrics.csv", "metrics.json", "loss.png", "slices.png", "ci.png",
                 "memorization.png"):
        assert (report / name).stat().st_size > 100, name
    assert "FID was not computed" in (report / "report.md").read_text()
    # synthetic brains masked by the rule of the training split, each mask beside its volume; the realism probe
    assert json.loads((res / "samples" / "mask_rule.json").read_text())["worst_kept"] >= 0.995
    assert len(list((res / "samples" / "demo" / "ddim").glob("nifti-*/*_mask.nii.gz"))) == 4
    realism = json.loads((res / "eval" / "demo" / "ddim" / "realism.json").read_text())
    assert set(realism["probes"]) == {"whole", "brain", "histogram", "texture", "whole_unmasked"}
    assert "## Realism" in (report / "report.md").read_text() and (report / "evidence-ddim.png").is_file()
    # what came in and what was left out: the report's Data section and the console at the end of the run
    text = (report / "report.md").read_text()
    assert "## Data" in text and "| siteA |" in text and (report / "qc-worst.png").stat().st_size > 1000
    qc = (res / "qc" / "qc.tsv").read_text().splitlines()
    assert len(qc) == 11 and all(line.endswith("\tpass") for line in qc[1:])  # the demo passes input QC
    assert "Data (input QC policy: warn):" in proc.stderr and "siteA:" in proc.stderr


@pytest.mark.slow
def test_rerun_does_nothing_and_sampling_changes_rerun_only_downstream(demo_run):
    tmp, _ = demo_run
    proc = run_demo(tmp, dry=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    over = yaml.safe_load((tmp / "overrides.yaml").read_text())
    over["sample"]["base_seed"] = 7
    changed = tmp / "changed.yaml"
    changed.write_text(yaml.safe_dump(over))
    proc = run_demo(tmp, extra=changed, dry=True)
    out = proc.stdout + proc.stderr
    rules = set(re.findall(r"^(\w+)\s+\d+$", out[out.index("Job stats:"):], flags=re.M)) - {"total"}
    assert rules == {"sample_part", "features", "bootstrap", "gather_metrics", "memorization", "realism_probe",
                     "report", "all"}


def _rule_block(out: str, rule: str) -> str:
    """A dry run's lines about the first job of `rule`, up to its shell command (profiles that print it)."""
    block = out[out.index(f"rule {rule}:"):]
    return block[:block.index("Shell command")]


def _planned_jobs(proc) -> dict[str, int]:
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", out[out.index("Job stats:"):], flags=re.M)
            if rule != "total"}


@pytest.mark.slow
def test_launch_and_the_other_samplers_keys_rerun_nothing_of_theirs(demo_run):
    """Where the training job runs and how fast (launch, performance) are no rerun triggers (no retraining
    after a qos, node or compile change), and a key of one sampler reruns that sampler's parts only."""
    tmp, _ = demo_run
    over = yaml.safe_load((tmp / "overrides.yaml").read_text())
    over["launch"] = {"executor": "local", "qos": "other", "max_requeues": 3, "time_min": 60, "setup": ["true"],
                      "collective_timeout_s": 60}
    over["performance"] = {"compile": False, "channels_last": True, "low_precision_norm": True}  # how fast only
    moved = tmp / "moved.yaml"
    moved.write_text(yaml.safe_dump(over))
    assert _planned_jobs(run_demo(tmp, extra=moved, dry=True)) == {}
    over["sample"]["ddim_steps"] = 7
    ddim = tmp / "ddim.yaml"
    ddim.write_text(yaml.safe_dump(over))
    proc = run_demo(tmp, extra=ddim, dry=True)
    # memorization checks every sampler's volumes, so it reruns with any sampler's parts
    assert _planned_jobs(proc) == {"sample_part": 2, "features": 1, "memorization": 1, "realism_probe": 1,
                                   "bootstrap": 2, "gather_metrics": 1, "report": 1, "all": 1}, proc.stdout[-3000:]
    assert "wildcards: sampler=ddpm" not in proc.stdout + proc.stderr
    # the training config itself still retrains
    over["train"]["lr"] = 2e-3
    lr = tmp / "lr.yaml"
    lr.write_text(yaml.safe_dump(over))
    assert _planned_jobs(run_demo(tmp, extra=lr, dry=True)).get("train") == 1


@pytest.mark.slow
def test_html_report(demo_run):
    tmp, _ = demo_run
    html = tmp / "report.html"
    snakemake("--report", str(html), "--configfile", "config/config.yaml", "config/demo.yaml",
              str(tmp / "overrides.yaml"))
    text = html.read_text(errors="replace")
    assert html.stat().st_size > 50_000 and "metrics.md" in text
    # the whole report.md travels as report.html (base64 inside Snakemake's page): the verdict, the FID
    # note, the memorization count, the NIfTI grid
    import base64

    found = re.search(r"filename=report\.html;base64,([A-Za-z0-9+/=]+)", text)
    assert found, "report.html is not in the Snakemake report"
    page = base64.b64decode(found.group(1)).decode()
    for words in ("Verdict", "real-halves floor", "FID was not computed", "Flagged synthetic volumes",
                  "The synthetic NIfTI files", "<table>", "data:image/png;base64,"):
        assert words in page, words


@pytest.mark.slow
def test_unconditional_outputs_carry_no_covariates(demo_run):
    """The unconditional path is what it was before conditioning: no covariate columns, datasets or model keys."""
    import h5py

    from brainddpm.data.manifest import MANIFEST_COLUMNS, SPLIT_COLUMNS
    from brainddpm.models.final import read_final

    res = demo_run[0] / "results"
    assert (res / "manifest.tsv").read_text().splitlines()[0].split("\t") == MANIFEST_COLUMNS
    assert (res / "splits.tsv").read_text().splitlines()[0].split("\t") == SPLIT_COLUMNS
    for path in [*res.glob("shards/*/shard-*.h5"), *res.glob("samples/demo/*/part-*.h5")]:
        with h5py.File(path) as f:
            assert "covariates" not in f and "stratum" not in f and "encoding" not in f.attrs, path
    assert "condition" not in read_final(res / "train" / "demo" / "model.safetensors", tensors=False)[0]
    assert not list(res.glob("samples/demo/conditions.json")) and not list(res.glob("eval/demo/*/conditioning.json"))


@pytest.mark.slow
def test_conditional_pipeline_plans_samples_and_checks_the_condition(tmp_path):
    """The conditional preset's DAG at test size: covariates reach the shards, the plan asks for strata,
    each synthetic volume stores what it was asked for, and the report has the conditioning section."""
    over = demo_overrides(tmp_path, **{**SMALL, "sample": {**SMALL["sample"], "samplers": ["ddim"], "n": 4,
                                                           "conditions": [{"age": 25, "n": 2}, {"age": 80, "n": 2}]},
                                       "demo": {"enabled": True, "n": 10, "seed": 0, "out": str(tmp_path / "demo"),
                                                "ventricle_growth_mm": 8}})
    args = ["--profile", "profiles/local", "--cores", "2", "--configfile", "config/config.yaml", "config/demo.yaml",
            "config/demo-conditional.yaml", str(over)]
    snakemake(*args)
    res = tmp_path / "results"
    header = (res / "splits.tsv").read_text().splitlines()[0].split("\t")
    assert header[-2:] == ["age", "sex"]
    plan = json.loads((res / "samples" / "demo-conditional" / "conditions.json").read_text())
    assert [v["covariates"]["age"] for v in plan["volumes"]] == [25, 25, 80, 80]
    assert plan["guidance_scale"] == 3.0 and plan["mode"] == "strata"
    sidecars = sorted((res / "samples" / "demo-conditional" / "ddim").glob("nifti-*/*.json"))
    assert [json.loads(p.read_text())["covariates"]["age"] for p in sidecars] == [25, 25, 80, 80]
    check = json.loads((res / "eval" / "demo-conditional" / "ddim" / "conditioning.json").read_text())
    assert [s["stratum"] for s in check["strata"]] == ["age=25", "age=80"] and "age" in check["ventricle_effect"]
    report = (res / "report" / "report.md").read_text()
    assert "## Conditioning: does the requested condition show?" in report and "age=80" in report
    assert (res / "report" / "strata-ddim.png").stat().st_size > 1000
    # changing the guidance scale replans and resamples; training and the data stage stay
    over_doc = yaml.safe_load(over.read_text())
    over_doc["sample"]["guidance_scale"] = 2.0
    over.write_text(yaml.safe_dump(over_doc))
    jobs = _planned_jobs(snakemake(*args, "-n"))
    assert "train" not in jobs and "shard" not in jobs and jobs.get("condition_plan") == 1, jobs


def test_conditional_preset_lints_clean():
    proc = snakemake("--lint", "--configfile", "config/config.yaml", "config/demo.yaml", "config/demo-conditional.yaml")
    assert "Congratulations" in proc.stdout + proc.stderr


def test_latent_preset_dry_run_on_leonardo_lists_the_latent_dag(tmp_path):
    """The README's 1 mm command: the LEONARDO profile with config/latent.yaml and a site config lists the
    latent DAG, its GPU rules on boost_usr_prod."""
    from helpers import bids_dataset

    bids_dataset(tmp_path / "bids", subjects=2)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"datasets": [{"name": "cohort", "root": str(tmp_path / "bids")}],
                                    "launch": {"executor": "slurm", "nodes": 2, "gpus_per_node": 4,
                                               "partition": "boost_usr_prod", "qos": "normal"}}))
    env = {**os.environ, "BRAINDDPM_SLURM_ACCOUNT": "dummy",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([*SNAKEMAKE, "-n", "--profile", "profiles/leonardo", "--configfile", "config/config.yaml",
                           "config/latent.yaml", str(site)], cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = _planned_jobs(proc)
    assert {"train_autoencoder", "latent_index", "train", "reconstruction", "sample_part", "report"} <= set(jobs), jobs
    assert jobs["latent_index"] == 2  # the training and the validation latents
    for rule in ("train_autoencoder", "train", "reconstruction", "sample_part"):
        block = _rule_block(out, rule)
        assert "slurm_partition=boost_usr_prod" in block, (rule, block)
        if rule.startswith("train"):  # they only submit and watch the submitit job: one thread
            assert "threads:" not in block, (rule, block)


def test_local_training_rules_claim_every_core(tmp_path):
    """Training on this machine (executor inprocess) takes every core it is given (training/runtime.py), so its
    rules declare them and Snakemake runs nothing beside them."""
    proc = snakemake("-n", "--profile", "profiles/local", "--cores", "2",
                     "--configfile", "config/config.yaml", "config/demo.yaml",
                     "config/demo-latent.yaml", str(demo_overrides(tmp_path)))
    out = proc.stdout + proc.stderr
    for rule in ("train_autoencoder", "train"):
        block = _rule_block(out, rule)
        assert f"threads: {min(2, os.cpu_count())}" in block or os.cpu_count() == 1, (rule, block)


def test_a_finetuning_run_takes_its_base_model_as_an_input_of_train(tmp_path):
    """finetune.init_from is an input of `train`: Snakemake orders it after the base and retrains when the base
    changes; a base that is not there stops the dry run naming its file."""
    base = tmp_path / "results" / "train" / "controls" / "model.safetensors"
    over = demo_overrides(tmp_path, finetune={"init_from": "controls"})
    missing = snakemake("-n", "--configfile", "config/config.yaml", "config/demo.yaml", str(over), check=False)
    assert missing.returncode != 0 and str(base) in missing.stdout + missing.stderr
    base.parent.mkdir(parents=True)
    base.write_bytes(b"a base model")  # a dry run reads no input
    proc = snakemake("-n", "--profile", "profiles/local", "--configfile", "config/config.yaml", "config/demo.yaml",
                     str(over))
    assert str(base) in _rule_block(proc.stdout + proc.stderr, "train")
