"""Launching: config checks before submission, SLURM parameters, in-process runs, and a 2-process
DeepSpeed (gloo) job through submitit's LocalExecutor that is preempted, requeued and resumed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from brainddpm.errors import BadInputError, BrainDDPMError, ConfigError
from brainddpm.training.launch import (
    ACTIVE_STATES,
    run_training,
    slurm_job_state,
    slurm_parameters,
    submit_training,
    visible_gpus,
    wait_training,
)
from brainddpm.training.runtime import TrainingInterrupted
from helpers import launch_config, losses, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "train")


@pytest.mark.parametrize("sections,key", [
    ({"launch": {"tasks_per_node": 2}}, "launch.executor"),  # inprocess is one process
    ({"launch": {"executor": "local", "nodes": 2}}, "launch.nodes"),
    ({"launch": {"executor": "local", "gpus_per_node": 64}}, "launch.gpus_per_node"),
    ({"launch": {"executor": "slurm", "gpus_per_node": 4, "tasks_per_node": 2}}, "launch.tasks_per_node"),
    ({"train": {"backend": "ddp", "zero_stage": 2}}, "train.zero_stage"),
    ({"train": {"micro_batch": 3, "grad_accum": 3}}, "train.micro_batch"),  # 9 volumes per step, 8 in the split
    ({"launch": {"executor": "local", "tasks_per_node": 3}, "train": {"micro_batch": 3}}, "train.micro_batch"),
    ({"model": {"channels": [8, 8, 12], "attention_levels": [False] * 3, "norm_num_groups": 4}},
     "model.num_head_channels"),
    ({"launch": {"executor": "kubernetes"}}, "launch.executor"),  # schema
])
def test_impossible_configs_fail_before_submission(shards, tmp_path, sections, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        run_training(launch_config(**sections), shards, tmp_path)
    assert not (tmp_path / "local").exists() and not (tmp_path / "train.json").exists()


def test_slurm_without_sbatch_and_missing_shards(shards, tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="index.json"):
        run_training(launch_config(), tmp_path / "nowhere", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError, match="no sbatch"):
        run_training(launch_config(launch={"executor": "slurm"}), shards, tmp_path)


def test_slurm_parameters_reach_sbatch(tmp_path):
    cfg = launch_config(run="leo", launch={
        "executor": "slurm", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 480,
        "partition": "boost_usr_prod", "account": "AIFAC_x", "qos": "normal", "time_min": 1440,
        "setup": ["module load python/3.11", "source venv/bin/activate"], "slurm_extra": {"exclusive": True}})
    script = _make_sbatch_string(command="python -m x", folder=str(tmp_path), **slurm_parameters(cfg))
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=480G",
                 "--time=1440", "--partition=boost_usr_prod", "--account=AIFAC_x", "--qos=normal",
                 "--signal=USR2@120", "--exclusive", "--job-name=brainddpm-train-leo"]:
        assert f"#SBATCH {line}" in script, line
    assert "module load python/3.11" in script and "source venv/bin/activate" in script
    # requeue allowed even where JobRequeue=0; the job step gets the CPUs (not inherited on SLURM 22.05-23.02)
    # and a rank that dies ends the step instead of leaving the others in a collective
    assert "#SBATCH --requeue" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=8" in srun and "--kill-on-bad-exit=1" in srun


def test_local_executor_keeps_the_users_gpu_mask(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ()  # no mask: submitit numbers the GPUs from 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == (2, 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3c1d2e")
    with pytest.raises(ConfigError, match="not a list of GPU indices"):
        visible_gpus()


def _signal_after_steps(out_dir: Path, steps: int, pids) -> threading.Thread:
    """Send SIGUSR2 (what SLURM sends before the time limit) to `pids()` once loss.csv has `steps` rows."""
    def run():
        while len(losses(out_dir, live=True)) < steps:
            time.sleep(0.02)
        for pid in pids():
            os.kill(pid, signal.SIGUSR2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_inprocess_run_stops_on_signal_and_resumes(shards, tmp_path):
    cfg = launch_config(train={"max_steps": 20, "checkpoint_every": 100})
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)  # never let a late signal end pytest
    try:
        _signal_after_steps(tmp_path, 2, lambda: [os.getpid()])
        with pytest.raises(TrainingInterrupted, match="stopped by signal at step"):
            run_training(cfg, shards, tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    saved = [int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and 2 <= saved[0] < 20
    result = run_training(cfg, shards, tmp_path)
    assert result["resumed_from_step"] == saved[0] and result["steps"] == 20
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 21))


def test_failed_job_names_its_logs(shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text((shards / "index.json").read_text())  # lists a shard that is not there
    with pytest.raises(BrainDDPMError, match=r"training job \S+ failed(.|\n)*shard-000.h5(.|\n)*_0_log.err"):
        run_training(launch_config(launch={"executor": "local"}), broken, tmp_path / "out")


def _task_pids(controller_pid: int) -> list[int]:
    text = Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.mark.slow  # about 30 s on 2 cores: two process starts (torch, MONAI, DeepSpeed) per attempt
@pytest.mark.parametrize("backend,zero_stage", [("deepspeed", 1), ("accelerate", 0)])
def test_two_processes_preempted_requeued_and_identical(shards, tmp_path, backend, zero_stage):
    """2 gloo processes (DeepSpeed ZeRO-1, Accelerate); SIGUSR2 mid-run (what SLURM sends before the time limit)."""
    cfg = launch_config(train={"backend": backend, "zero_stage": zero_stage, "micro_batch": 1, "max_steps": 24,
                      "checkpoint_every": 100},
               launch={"executor": "local", "tasks_per_node": 2, "time_min": 10, "max_requeues": 1})
    job = submit_training(cfg, shards, tmp_path)
    _signal_after_steps(tmp_path, 2, lambda: _task_pids(job._process.pid))
    result = wait_training(job)
    assert result["requeues"] == 1 and 2 <= result["resumed_from_step"] < 24, result
    assert result["world_size"] == 2 and result["steps"] == 24
    assert len(result["weights_sha256"]) == 2 and len(set(result["weights_sha256"])) == 1
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 25))
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "preemption signal; checkpoint saved" in log and "requeuing training" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_is_signalled_requeued_and_resumed(slurm_env, shards, tmp_path):
    """2 tasks (DDP, gloo) on the local SLURM cluster; USR2 as SLURM sends it before the time limit."""
    cfg = launch_config(train={"backend": "ddp", "micro_batch": 1, "max_steps": 24, "checkpoint_every": 100},
               launch={"executor": "slurm", "tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 1,
                       "partition": slurm_env.partition, "time_min": 10, "max_requeues": 1})
    job = submit_training(cfg, shards, tmp_path)
    deadline = time.time() + 180
    while len(losses(tmp_path, live=True)) < 2:
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)
    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    result = wait_training(job)
    assert result["requeues"] == 1 and 2 <= result["resumed_from_step"] < 24, result
    assert result["world_size"] == 2 and len(set(result["weights_sha256"])) == 1
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 25))
    assert (tmp_path / "slurm").is_dir()


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_that_dies_without_results_fails_the_wait(slurm_env, shards, tmp_path):
    """A job whose task dies without its result file (here scancel; for users an OOM kill or a lost node) fails
    the wait and names the logs. The test cluster has no sacct, where submitit alone would wait forever."""
    cfg = launch_config(train={"backend": "ddp", "micro_batch": 1, "max_steps": 500, "checkpoint_every": 1000},
               launch={"executor": "slurm", "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 1,
                       "partition": slurm_env.partition, "time_min": 10})
    job = submit_training(cfg, shards, tmp_path)
    deadline = time.time() + 180
    while not losses(tmp_path, live=True):
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)
    slurm_env.run("scancel", job.job_id)
    started = time.time()
    with pytest.raises(BrainDDPMError, match=rf"training job {job.job_id} failed: SLURM ended the job(.|\n)*"
                                             r"_0_log.err"):
        wait_training(job, squeue_every_s=1, grace_s=3)
    assert time.time() - started < 90, "the wait outlived the job by far more than its grace"
    assert not (tmp_path / "train.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_attaches_to_the_running_slurm_job_after_the_waiter_dies(slurm_env, shards, tmp_path):
    """Losing the login session kills `brainddpm train` (the waiter), not the SLURM job: a rerun waits for
    that same job instead of submitting a second one into the same checkpoint folder."""
    import json
    import subprocess
    import sys

    from brainddpm.config import dumps

    cfg = launch_config(train={"backend": "ddp", "micro_batch": 1, "max_steps": 30, "checkpoint_every": 100},
               launch={"executor": "slurm", "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 1,
                       "partition": slurm_env.partition, "time_min": 10})
    waiter = subprocess.Popen(
        [str(Path(sys.executable).parent / "brainddpm"), "train", "--config-json", dumps(cfg), "--shards", str(shards),
         "--out", str(tmp_path)], stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 180
    while len(losses(tmp_path, live=True)) < 2:
        assert time.time() < deadline and waiter.poll() is None, "training made no progress"
        time.sleep(0.2)
    waiter.kill()  # like a closed terminal: no chance to clean up
    waiter.wait()
    first = json.loads((tmp_path / "job.json").read_text())["job_id"]
    result = run_training(cfg, shards, tmp_path)  # the rerun
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] == first
    assert result["steps"] == 30 and result["resumed_from_step"] is None  # one job did all the training
    assert [s for s, _ in losses(tmp_path)] == list(range(1, 31))
    submitted = [line for line in (tmp_path / "slurm").glob("*_submission.sh")]
    assert len(submitted) == 1, submitted
    # once SLURM no longer runs the job, a rerun submits again (and resumes from the last checkpoint)
    deadline = time.time() + 60
    while slurm_job_state(first) in ACTIVE_STATES:  # e.g. COMPLETING for a moment
        assert time.time() < deadline, "the finished job stays active in squeue"
        time.sleep(0.5)
    again = run_training(cfg, shards, tmp_path)
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] != first and again["steps"] == 30
