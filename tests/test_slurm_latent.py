"""The latent DAG (model.kind: latent) on the local SLURM test cluster, through profiles/ci-slurm.

One Snakemake run of the demo preset, shrunk, with a tiny autoencoder: the data stage, `train_autoencoder`
(a localrule that submits its own submitit SLURM job, as `train` does), `encode` (one plugin job per shard),
`latent_index`, `train` on the latent shards (a second submitit job), sampling that decodes, the evaluation at
image resolution, `reconstruction` and the report, every other rule a SLURM job of the plugin. About three
minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from brainddpm.models.autoencoder import load_autoencoder

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUN = "latent"
SLURM_RULES = {"demo_cohort", "manifest", "split", "shard", "shard_index", "encode", "latent_index", "sample_part",
               "features", "bootstrap", "gather_metrics", "memorization", "reconstruction", "report"}


def overrides(tmp: Path) -> dict:
    demo = tmp / "demo"
    return {
        "results": str(tmp / "results"), "run": RUN,
        "demo": {"enabled": True, "n": 8, "seed": 0, "out": str(demo)},
        "datasets": [{"name": s, "root": str(demo / s), "participants": str(demo / "participants.tsv")}
                     for s in ("siteA", "siteB", "siteC")],
        "data": {"volumes_per_shard": 4, "val_fraction": 0.5},
        "model": {"kind": "latent"},  # the demo's UNet on 2x8x8x8 latents (24x32x24 padded to 32^3, 4x)
        "autoencoder": {"channels": [4, 8, 8], "latent_channels": 2, "num_res_blocks": 1,
                        "attention_levels": [False, False, False], "norm_num_groups": 4, "use_checkpoint": False,
                        "pad_multiple": 16, "patch": None, "adversarial": {"weight": 0.0},
                        "train": {"max_steps": 4, "micro_batch": 1, "checkpoint_every": 2}},
        "decode": {"roi": [4, 4, 4], "overlap": 0.25, "sw_batch_size": 2},  # sliding windows, as on small GPUs
        "scheduler": {"num_train_timesteps": 50},
        "train": {"backend": "ddp", "epochs": 100, "max_steps": 4, "micro_batch": 1, "checkpoint_every": 2,
                  "keep_last": 2, "log_every": 2, "num_workers": 0},
        "launch": {"executor": "slurm", "account": False, "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1,
                   "cpus_per_task": 1, "mem_gb": 1, "partition": "debug", "time_min": 20, "max_requeues": 1},
        "sample": {"n": 4, "batch": 2, "jobs": 2, "samplers": ["ddim"], "ddim_steps": 5},
        "evaluate": {"n": 4, "bootstrap": 20, "jobs": 2, "fid": {"weights": None}},
    }


def _rule(record) -> str | None:
    c = record.get("comment") or ""
    return c[len("rule_"):].split("_wildcards_")[0] if c.startswith("rule_") else None


@pytest.fixture(scope="module")
def latent_run(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-latent")
    (tmp / "overrides.yaml").write_text(yaml.safe_dump(overrides(tmp)))
    before = {r["job_id"] for r in slurm_cluster.job_records()}
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/ci-slurm", "--slurm-logdir", str(tmp / "logs"),
           "--configfile", "config/config.yaml", "config/demo.yaml", str(tmp / "overrides.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True, timeout=900)
    records = [r for r in slurm_cluster.job_records() if r["job_id"] not in before]
    return {"tmp": tmp, "res": tmp / "results", "proc": proc, "records": records,
            "diag": proc.stdout[-3000:] + proc.stderr[-5000:]}


def test_latent_dag_runs_on_slurm(latent_run):
    res, diag = latent_run["res"], latent_run["diag"]
    assert latent_run["proc"].returncode == 0, diag
    by_rule: dict[str, list[dict]] = {}
    for r in latent_run["records"]:
        if _rule(r):
            by_rule.setdefault(_rule(r), []).append(r)
    assert set(by_rule) == SLURM_RULES, diag
    assert all(any(j["state"] == "COMPLETED" for j in jobs) for jobs in by_rule.values()), diag
    n_shards = sum(len(json.loads((res / "shards" / s / "index.json").read_text())["shards"]) for s in ("train", "val"))
    assert len([j for j in by_rule["encode"] if j["state"] == "COMPLETED"]) == n_shards, diag
    # both trainings are submitit jobs of their own (train_autoencoder and train are localrules under slurm)
    trainings = [r for r in latent_run["records"] if r["name"] == f"brainddpm-train-{RUN}"]
    assert len(trainings) == 2 and all(r["state"] == "COMPLETED" for r in trainings), diag


def test_latent_outputs_agree_on_the_scale_factor(latent_run):
    res = latent_run["res"]
    _, ae = load_autoencoder(res / "autoencoder" / RUN / "autoencoder.safetensors")
    index = json.loads((res / "latents" / RUN / "train" / "index.json").read_text())
    assert index["latent"]["scale_factor"] == ae["scale_factor"] and index["latent"]["latent_shape"] == [2, 8, 8, 8]
    from brainddpm.models.final import read_final

    model, _ = read_final(res / "train" / RUN / "model.safetensors", tensors=False)
    assert model["data"]["scale_factor"] == ae["scale_factor"] and model["data"]["target_shape"] == [24, 32, 24]
    report = (res / "report" / "report.md").read_text()
    assert "## Reconstruction (autoencoder of the latent model)" in report and "windows of 4x4x4" in report
    recon = json.loads((res / "eval" / RUN / "reconstruction.json").read_text())
    assert recon["n"] >= 4 and {"psnr", "ssim", "mae"} <= set(recon["metrics"])
    parts = sorted((res / "samples" / RUN / "ddim").glob("nifti-*/*.nii.gz"))
    assert len(parts) == 4, parts


def test_activation_checkpointing_is_no_rerun_trigger(latent_run, slurm_cluster):
    """Switching autoencoder.use_checkpoint (memory, not results) after the run plans nothing; the dry run still
    hands the new value to the autoencoder's job (a resource, not a parameter)."""
    tmp = latent_run["tmp"]
    assert latent_run["proc"].returncode == 0, latent_run["diag"]
    changed = overrides(tmp)
    changed["autoencoder"]["use_checkpoint"] = True
    (tmp / "checkpointing.yaml").write_text(yaml.safe_dump(changed))
    base = [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/ci-slurm"]
    configs = ["--configfile", "config/config.yaml", "config/demo.yaml", str(tmp / "checkpointing.yaml")]
    proc = subprocess.run([*base, *configs], cwd=ROOT, env=slurm_cluster.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    proc = subprocess.run([*base, "--forcerun", "train_autoencoder", *configs], cwd=ROOT, env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert "--use-checkpoint true" in proc.stdout + proc.stderr, proc.stdout[-3000:]
