"""A real Snakemake run for the newcomer's frictions 1 and 3: a results folder with a space, forcing a stage."""

from __future__ import annotations

import pytest

from test_workflow import _planned_jobs, demo_overrides, snakemake

CONFIGS = ["--configfile", "config/config.yaml", "config/demo.yaml"]


@pytest.mark.slow
def test_a_results_folder_with_a_space_runs_the_data_stage(tmp_path):
    """Friction 1: every path of the shell lines is quoted (2> {log} included), so the data stage's rules
    (demo_cohort, manifest, split, shard, shard_index) run in `my results/` and write nothing beside it."""
    tmp = tmp_path / "my folder"
    tmp.mkdir()
    over = demo_overrides(tmp, results=str(tmp / "my results"), data={"volumes_per_shard": 8, "val_fraction": 0.5})
    snakemake("prepare", "--profile", "profiles/local", "--cores", "2", *CONFIGS, str(over))
    results = tmp / "my results"
    for split in ("train", "val"):
        assert (results / "shards" / split / "index.json").is_file()
    assert (results / "logs" / "manifest.log").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == ["demo", "my results", "overrides.yaml"]  # no stray file
    assert not (tmp_path / "my").exists()
    # Friction 3: a stage's target (prepare, sample, evaluate) only groups its files, so forcing it forces
    # nothing; forcing the rule that makes them (shard; sample_part, train, features, ...) reruns them
    args = ["prepare", "-n", "--profile", "profiles/local", "--cores", "2", *CONFIGS, str(over)]
    assert _planned_jobs(snakemake(*args, "--forcerun", "prepare")) in ({}, {"prepare": 1})
    forced = _planned_jobs(snakemake(*args, "--forcerun", "shard"))
    assert forced.get("shard") == 2 and forced.get("shard_index") == 2, forced
    assert "manifest" not in forced and "demo_cohort" not in forced
