"""Smoke tests of the local SLURM test cluster (fixture `slurm_cluster`, tests/conftest.py).

(a) a plain sbatch job shows up, COMPLETED, in the job records;
(b) submitit runs a 2-task job whose tasks set up torch.distributed (gloo)
    with TorchDistributedEnvironment and all_reduce;
(c) a submitit Checkpointable job gets the time-limit signal (USR2, what
    submitit's --signal=USR2@N asks SLURM to send before the limit),
    checkpoints, requeues itself (scontrol requeue) and finishes, resumed.

The submitit callables below are pickled by value (cloudpickle), so the jobs
do not need to import this module.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm


def _executor(folder, cluster, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_partition=cluster.partition, timeout_min=10, mem_gb=1, **params)
    return ex


# ----------------------------------------------------------------------------- (a)


def test_sbatch_job_is_recorded(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    jid = slurm_cluster.sbatch("-J", "smoke-hello", "-o", str(out), "-t", "1",
                               "--wrap", "echo hello from $SLURM_JOB_ID")
    assert slurm_cluster.wait_job(jid, timeout=30) == "COMPLETED"
    assert out.read_text().strip() == f"hello from {jid}"
    rec = {r["job_id"]: r for r in slurm_cluster.job_records()}[jid]
    assert rec["name"] == "smoke-hello"
    assert rec["state"] == "COMPLETED"
    assert rec["exit_code"] == "0:0"
    assert rec["partition"] == slurm_cluster.partition
    assert rec["requeues"] == 0
    assert [r["state"] for r in rec["runs"]] == ["COMPLETED"]  # from jobcomp.txt


# ----------------------------------------------------------------------------- (b)


def _gloo_all_reduce():
    import datetime

    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    # bounded: a rank left alone must fail within the test's wait, not hang on for the default 30 min
    dist.init_process_group(backend="gloo", init_method="env://", timeout=datetime.timedelta(seconds=120))
    try:
        t = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(t)
        return {"rank": env.rank, "world_size": dist.get_world_size(), "sum": t.item(),
                "job_id": os.environ["SLURM_JOB_ID"]}
    finally:
        dist.destroy_process_group()


def test_submitit_two_task_gloo(slurm_env, tmp_path):
    ex = _executor(tmp_path / "submitit", slurm_env, nodes=1, tasks_per_node=2, cpus_per_task=1,
                   name="smoke-gloo")
    job = ex.submit(_gloo_all_reduce)
    results = slurm_env.wait_results(job, timeout=300)  # one per task
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results)
    assert slurm_env.wait_job(job.job_id, timeout=30) == "COMPLETED"
    rec = {r["job_id"]: r for r in slurm_env.job_records()}[job.job_id]
    assert rec["name"] == "smoke-gloo" and rec["state"] == "COMPLETED"


# ----------------------------------------------------------------------------- (c)


class _Counter(submitit.helpers.Checkpointable):
    """Counts to `total`, one step per `dt` s, progress in a JSON file; resumes from it."""

    def __call__(self, progress: str, total: int, dt: float = 0.5):
        env = submitit.JobEnvironment()
        path = Path(progress)
        start = json.loads(path.read_text())["step"] if path.exists() else 0
        step = start
        while step < total:
            time.sleep(dt)
            step += 1
            if env.global_rank == 0:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "start": start}))
                tmp.replace(path)
        return {"rank": env.global_rank, "start": start, "final": step,
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


def _wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


def test_submitit_checkpoint_requeue(slurm_env, tmp_path):
    progress = tmp_path / "progress.json"
    total = 16
    ex = _executor(tmp_path / "submitit", slurm_env, nodes=1, tasks_per_node=2, cpus_per_task=1,
                   name="smoke-requeue", slurm_signal_delay_s=30)
    job = ex.submit(_Counter(), str(progress), total)

    def step():
        return json.loads(progress.read_text())["step"] if progress.exists() else 0

    _wait_for(lambda: step() >= 3, 45, "job made no progress")
    # what SLURM sends `signal_delay_s` before the time limit (submitit's --signal=USR2@N);
    # submitit's own test hook job._interrupt(timeout=True) does the same
    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    interrupted_at = step()
    results = slurm_env.wait_results(job, timeout=150)
    r0 = next(r for r in results if r["rank"] == 0)
    assert r0["final"] == total
    assert 0 < r0["start"] < total, r0  # resumed from the checkpointed progress
    assert r0["start"] >= interrupted_at
    assert r0["restart_count"] >= 1
    # the result files come before SLURM has finished the job
    assert slurm_env.wait_job(job.job_id, timeout=30) == "COMPLETED"
    rec = {r["job_id"]: r for r in slurm_env.job_records()}[job.job_id]
    assert rec["requeues"] >= 1, rec
    assert rec["state"] == "COMPLETED", rec
    assert [r["state"] for r in rec["runs"]][-1] == "COMPLETED", rec
    assert len(rec["runs"]) >= 2, rec  # one jobcomp entry for the requeued run, one for the last


# ----------------------------------------------------------------------------- (d)

_TOY_SNAKEFILE = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    shell: "echo $SLURM_JOB_ID > {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cat {input} > {output}; echo $SLURM_JOB_ID >> {output}"
"""


def test_ci_slurm_profile_runs_toy_workflow(slurm_cluster, tmp_path):
    """profiles/ci-slurm drives the SLURM executor plugin on the test cluster: every rule is a SLURM job."""
    import subprocess

    profile = Path(__file__).resolve().parents[1] / "profiles" / "ci-slurm"
    (tmp_path / "Snakefile").write_text(_TOY_SNAKEFILE)
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(profile)],
        cwd=tmp_path, env=slurm_cluster.env, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job_a, = (tmp_path / "a.txt").read_text().split()
    assert (tmp_path / "b.txt").read_text().split()[0] == job_a
    recs = {r["comment"]: r for r in slurm_cluster.job_records() if r["work_dir"] == str(tmp_path)}
    assert set(recs) == {"rule_a", "rule_b"}, recs
    assert recs["rule_a"]["job_id"] == job_a
    assert all(r["state"] == "COMPLETED" and r["partition"] == "debug" for r in recs.values()), recs
    assert (tmp_path / ".snakemake" / "slurm_logs" / "rule_a" / f"{job_a}.log").exists()
