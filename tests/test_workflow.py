"""Real Snakemake runs of the workflow on a tiny demo cohort."""

import json
import os
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
        "data": {"volumes_per_shard": 4},
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


@pytest.mark.slow
def test_prepare_end_to_end(tmp_path):
    over = demo_overrides(tmp_path)
    snakemake("prepare", "--profile", "profiles/local", "--cores", "2",
              "--configfile", "config/config.yaml", "config/demo.yaml", str(over))
    res = tmp_path / "results"
    index = {s: json.loads((res / "shards" / s / "index.json").read_text()) for s in ("train", "val")}
    assert index["train"]["n_volumes"] + index["val"]["n_volumes"] == 10
    assert (res / "qc" / "excluded.tsv").read_text().startswith("path\tdataset\treason")
    assert (tmp_path / "demo" / "mosaic.png").stat().st_size > 10_000
    for s in ("train", "val"):
        for shard in index[s]["shards"]:
            assert (res / "shards" / s / shard["file"]).exists()
    # nothing left to do on a rerun
    proc = snakemake("prepare", "-n", "--profile", "profiles/local", "--configfile", "config/config.yaml",
                     "config/demo.yaml", str(over))
    assert "Nothing to be done" in proc.stdout + proc.stderr
