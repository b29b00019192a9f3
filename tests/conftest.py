import os
import sys
from pathlib import Path

import pytest


# --------------------------------------------------------------------------- SLURM
# A one-node SLURM cluster on localhost (tests/slurm/cluster.py), started once
# per session on first use and stopped at the end.  Skips with the reason where
# SLURM cannot be installed or started, except with CI=true, where it fails.


def _slurm_helper():
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from slurm import cluster

    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running SLURM cluster (tests.slurm.cluster.Cluster).

    .env        environment for subprocesses (SLURM_CONF, PATH); pass env=
    .conf       path of its slurm.conf; .partition == "debug"; .cpus
    .run(*cmd)  run a SLURM client command; .sbatch(*args) -> job id
    .wait_job(job_id) -> final state; .job_records() -> list of dicts
    """
    helper = _slurm_helper()
    required = os.environ.get("CI") == "true"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"SLURM test cluster required (CI=true) but unavailable: {reason}", pytrace=False)
        pytest.skip(f"SLURM test cluster unavailable: {reason}")

    reason = helper.ensure_installed()
    if reason:
        unavailable(reason)
    try:
        cluster = helper.start(tmp_path_factory.mktemp("slurm"))
    except helper.SlurmUnavailable as e:
        unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """For code that calls sbatch/scancel/scontrol from the test process (submitit): the cluster's
    SLURM_CONF and PATH, and no SLURM variables inherited from an outer job."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    return slurm_cluster
