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


def _start_cluster(workdir, **kwargs):
    """Start a test cluster, or skip with the reason (fail with CI=true, where SLURM is required)."""
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
        return helper.start(workdir, **kwargs)
    except helper.SlurmUnavailable as e:
        unavailable(str(e))


def on_slurm(nodeid: str) -> bool:
    """A test that uses a SLURM test cluster: its file or its name says slurm (tests/test_slurm_*.py,
    tests/training/test_slurm_multinode.py, test_launch.py's test_*slurm* tests)."""
    path, _, name = nodeid.partition("::")
    return "slurm" in Path(path).name or "slurm" in name


def pytest_collection_modifyitems(config, items):
    """The SLURM tests first: under pytest-xdist their worker starts on the longest chain (below)."""
    items[:] = sorted(items, key=lambda item: not on_slurm(item.nodeid))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it (-p no:xdist) it is not called
def pytest_xdist_make_scheduler(config, log):
    """Which tests run together under pytest-xdist (`make test`: two workers). Every SLURM test goes to one
    worker: they share the session's one-node cluster, which claims /run/slurm/conf and so exists once per
    machine, and most of their time is the SLURM plugin's status polling, which the other worker fills with
    the CPU tests. Every other test stays with its module, so that a module's fixtures (a whole demo run,
    trained models) are built once, as without xdist. A scheduler of our own, because xdist 3.8's
    `xdist_group` marks do not group under pytest 9.2 (the id suffix it sets is not seen)."""
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if on_slurm(nodeid) else nodeid.split("::")[0]

    config.option.loadscopereorder = False  # collection order: the SLURM group is handed out first
    return SlurmTogether(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used a SLURM test cluster reports the cluster's queue, nodes and daemon logs."""
    report = yield
    if report.failed:
        for name in ("slurm_cluster", "slurm_two_nodes"):
            cluster = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if cluster is not None:
                report.sections.append((f"SLURM test cluster ({name})", cluster.state_dump()))
    return report


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running SLURM cluster (tests.slurm.cluster.Cluster).

    .env        environment for subprocesses (SLURM_CONF, PATH); pass env=
    .conf       path of its slurm.conf; .partition == "debug"; .cpus
    .run(*cmd)  run a SLURM client command; .sbatch(*args) -> job id
    .wait_job(job_id) -> final state; .job_records() -> list of dicts
    """
    cluster = _start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    """A 2-node SLURM cluster (node1, node2), each slurmd in its own network namespace on a private
    bridge (tests/slurm/cluster.py, PrivateNetwork); .nodes, .network and the rest as slurm_cluster.
    It does not claim /run/slurm/conf, so it may run next to the session's one-node cluster."""
    cluster = _start_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
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
