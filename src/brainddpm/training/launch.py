"""How training is submitted and run: executors, the submitted job, requeue on preemption.

`run_training(cfg, shards_dir, out_dir)` checks the config against the launch settings, then runs
`train.train` according to launch.executor:

* "inprocess": in this process, one device (the demo, tests).
* "local": submitit's LocalExecutor, one process per GPU (launch.tasks_per_node, else gpus_per_node,
  else 1 CPU process) on this machine.
* "slurm": submitit's SlurmExecutor, launch.nodes x tasks_per_node tasks with gpus_per_node GPUs per
  node; logs and submitit's files in out_dir/slurm/.

Inside each task `TrainJob` exports the torch.distributed rendezvous (submitit's
TorchDistributedEnvironment). Preemption and time limits: SLURM (or the local controller) sends SIGUSR2
launch.signal_delay_s before the end; the training loop finishes its step, all ranks write a checkpoint,
and submitit's handler calls `TrainJob.checkpoint`, which requeues the job (at most launch.max_requeues
times per submission, counted in out_dir/requeues.json). Any rerun resumes from the newest checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import submitit
import torch
from submitit.core.utils import UncompletedJobError

from brainddpm.config import tasks_per_node, validate_config
from brainddpm.data.shards import training_split
from brainddpm.errors import BadInputError, BrainDDPMError, ConfigError
from brainddpm.fileio import atomic_path
from brainddpm.training.loop import train
from brainddpm.training.losslog import LIVE_STATUS, format_duration
from brainddpm.training.outputs import read_requeues, write_requeues
from brainddpm.training.tasks import check_kind

log = logging.getLogger(__name__)



# ---- before submission: checks, executors ----

def _train_split_size(shards_dir: Path) -> int:
    index = training_split(shards_dir) / "index.json"
    if not index.exists():
        raise BadInputError(index, "shard index not found (run `snakemake prepare` first)")
    return int(json.loads(index.read_text())["n_volumes"])


def check_launch(cfg: dict, shards_dir: Path) -> None:
    """Fail before submitting anything on configs that cannot run; each error names the key."""
    validate_config(cfg, partial=True)  # schema and cross-key rules (config.py); below: this machine's facts
    tc, lc = cfg["train"], cfg["launch"]
    gpus, tasks, executor = lc["gpus_per_node"], tasks_per_node(lc), lc["executor"]
    if executor in ("local", "inprocess") and gpus > torch.cuda.device_count():
        raise ConfigError(f"config key 'launch.gpus_per_node': {gpus} GPUs requested, this machine has "
                          f"{torch.cuda.device_count()}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("config key 'launch.executor': slurm, but there is no sbatch on PATH")
    world = lc["nodes"] * tasks
    n = _train_split_size(shards_dir)
    if n // world < tc["micro_batch"] * tc["grad_accum"]:
        raise ConfigError(f"config key 'train.micro_batch': {world} process(es) x micro_batch {tc['micro_batch']} "
                          f"x grad_accum {tc['grad_accum']} need more than the {n} training volumes for one step")


def slurm_parameters(cfg: dict) -> dict:
    """Keyword arguments for submitit's SlurmExecutor.update_parameters, from launch.*."""
    lc = cfg["launch"]
    mem = lc["mem_gb"]  # per node
    params = {
        "job_name": f"brainddpm-train-{cfg['run']}", "nodes": lc["nodes"], "ntasks_per_node": tasks_per_node(lc),
        "cpus_per_task": lc["cpus_per_task"], "mem": f"{mem:g}G" if float(mem).is_integer() else f"{int(mem * 1024)}M",
        "time": lc["time_min"], "signal_delay_s": lc["signal_delay_s"],
        # --requeue: clusters with JobRequeue=0 would otherwise refuse submitit's `scontrol requeue`
        "setup": list(lc["setup"]),
        "additional_parameters": {"requeue": True, **lc["slurm_extra"]},
        # srun does not inherit --cpus-per-task from the allocation on SLURM 22.05-23.02 (DataLoader workers
        # would share one core); --kill-on-bad-exit ends every task when one dies instead of leaving the
        # others waiting in a collective until its timeout
        "srun_args": [f"--cpus-per-task={lc['cpus_per_task']}", "--kill-on-bad-exit=1"],
    }
    if lc["gpus_per_node"]:
        params["gpus_per_node"] = lc["gpus_per_node"]
    params.update({k: lc[k] for k in ("partition", "account", "qos") if lc[k] not in (None, False)})
    return params


def make_executor(cfg: dict, out_dir: Path) -> submitit.Executor:
    """The submitit executor for launch.executor "slurm" or "local"; its files go to out_dir/<executor>/."""
    lc = cfg["launch"]
    folder = Path(out_dir) / lc["executor"]
    if lc["executor"] == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=lc["max_requeues"])
        executor.update_parameters(**slurm_parameters(cfg))
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=lc["max_requeues"])
    executor.update_parameters(timeout_min=lc["time_min"], gpus_per_node=lc["gpus_per_node"],
                               tasks_per_node=tasks_per_node(lc), setup=list(lc["setup"]),
                               signal_delay_s=lc["signal_delay_s"], visible_gpus=visible_gpus())
    return executor


def visible_gpus() -> tuple[int, ...]:
    """The GPUs this machine's user left visible (CUDA_VISIBLE_DEVICES), for the local executor.

    submitit's LocalExecutor sets CUDA_VISIBLE_DEVICES=0..n-1 for its tasks unless told which GPUs may be
    used; passing the user's mask keeps `CUDA_VISIBLE_DEVICES=2,3 snakemake ...` on GPUs 2 and 3.
    """
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return ()
    items = [m.strip() for m in mask.split(",") if m.strip()]
    if not all(m.isdigit() for m in items):
        raise ConfigError(f"config key 'launch.executor': local, but CUDA_VISIBLE_DEVICES={mask!r} is not a list of "
                          "GPU indices (submitit's local executor takes indices, not UUIDs)")
    return tuple(int(m) for m in items)


# ---- the submitted job ----

class TrainJob(submitit.helpers.Checkpointable):
    """What every task of the job runs; on preemption/timeout submitit calls `checkpoint` (rank 0)."""

    def __init__(self, cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> None:
        self.cfg, self.shards_dir, self.out_dir, self.kind = cfg, str(shards_dir), str(out_dir), kind

    def __call__(self) -> dict:
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; every GPU of the node stays visible
        # (see runtime.setup_runtime)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return train(self.cfg, Path(self.shards_dir), Path(self.out_dir), getattr(self, "kind", "diffusion"))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """Requeue (the loop has just written a checkpoint, or the latest periodic one is used).

        Returns None, which makes submitit end the job as failed, after launch.max_requeues requeues.
        """
        counts = read_requeues(Path(self.out_dir))
        if counts["submission"] >= self.cfg["launch"]["max_requeues"]:
            log.error("not requeuing: launch.max_requeues=%d requeues already done; rerun to resume",
                      self.cfg["launch"]["max_requeues"])
            return None
        write_requeues(Path(self.out_dir), {"total": counts["total"] + 1, "submission": counts["submission"] + 1})
        log.warning("requeuing training (requeue %d of at most %d)", counts["submission"] + 1,
                    self.cfg["launch"]["max_requeues"])
        return submitit.helpers.DelayedSubmission(self)


def _log_paths(job: submitit.Job) -> str:
    tasks = range(getattr(job, "num_tasks", 1) or 1)
    paths = [submitit.core.utils.JobPaths(job.paths.folder, job.job_id, task_id=t) for t in tasks]
    return "\n".join(f"  {p.stdout}\n  {p.stderr}" for p in paths)


def submit_training(cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> submitit.Job:
    """Check the config, then submit the training job (local or slurm executor); returns the job."""
    check_launch(cfg, shards_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_requeues(out_dir, {**read_requeues(out_dir), "submission": 0})
    job = make_executor(cfg, out_dir).submit(TrainJob(cfg, Path(shards_dir).resolve(), out_dir.resolve(), kind))
    print(f"submitted training job {job.job_id} ({cfg['launch']['executor']}); logs:\n{_log_paths(job)}",
          file=sys.stderr, flush=True)
    return job


JOB_RECORD = "job.json"
# SLURM states of a job that will still run or is running: a rerun attaches to it instead of submitting again
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED"}


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as squeue shows it, or None when SLURM no longer lists it (finished or unknown)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrainDDPMError(f"cannot ask SLURM about training job {job_id} (squeue: {exc}); rerun when squeue "
                             "answers, so that a second job is not submitted next to it") from None
    if proc.returncode != 0:  # "Invalid job id specified": the job has left the queue
        return None
    states = proc.stdout.split()
    return states[0] if states else None


def submit_or_attach(cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> submitit.Job:
    """The run's training job: the one recorded in out_dir/job.json while SLURM still runs or queues it,
    else a new submission (recorded there).

    Losing the login session kills the waiting `brainddpm train` (and Snakemake), not the SLURM job; a
    rerun then waits for that job instead of submitting a second one into the same checkpoint folder. A
    lock makes the check and the submission one step, so two processes never both submit.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".submit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record_path = out_dir / JOB_RECORD
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if record and record["executor"] == "slurm" and cfg["launch"]["executor"] == "slurm":
            state = slurm_job_state(record["job_id"])
            if state in ACTIVE_STATES:
                job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"],
                                        tasks=tuple(range(record["tasks"])))
                print(f"attaching to training job {job.job_id} ({state}, submitted {record['submitted']}); "
                      f"logs:\n{_log_paths(job)}", file=sys.stderr, flush=True)
                return job
        job = submit_training(cfg, shards_dir, out_dir, kind)
        tasks = cfg["launch"]["nodes"] * tasks_per_node(cfg["launch"])
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps({"executor": cfg["launch"]["executor"], "job_id": str(job.job_id),
                                       "folder": str(job.paths.folder), "tasks": tasks,
                                       "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        return job


def _wait_slurm_job(job: submitit.SlurmJob, squeue_every_s: float, grace_s: float,
                    tick: Callable[[], object] = lambda: None) -> None:
    """Return once every task of `job` has left its result file, or once SLURM has ended the job.

    submitit learns that a job has ended from `sacct`. Where sacct does not answer (clusters without
    accounting storage, the test cluster), a job that died without writing its result files (killed,
    cancelled, out of memory, node lost) stays "UNKNOWN" and `job.results()` waits forever. So this also
    asks squeue every `squeue_every_s`: once SLURM no longer runs or queues the job, the result files get
    `grace_s` to appear (shared file systems lag); then the caller's `job.results()` fails. `tick` runs
    every second (the progress line).
    """
    ended_at, asked_at = None, 0.0
    while not job.done():
        tick()
        if time.monotonic() - asked_at >= squeue_every_s:
            asked_at = time.monotonic()
            try:
                state = slurm_job_state(job.job_id)
            except BrainDDPMError:  # squeue did not answer this time: keep waiting
                state = "PENDING"
            if state in ACTIVE_STATES:
                ended_at = None
            elif ended_at is None:
                ended_at = time.monotonic()
                log.info("SLURM lists training job %s as %s; waiting up to %.0f s for its result files",
                         job.job_id, state or "gone", grace_s)
        if ended_at is not None and time.monotonic() - ended_at > grace_s:
            raise BrainDDPMError(f"SLURM ended the job (squeue: {state or 'no longer listed'}) but not every "
                                 f"task wrote its result within {grace_s:.0f} s (killed, cancelled, out of "
                                 "memory or node lost?)")
        time.sleep(1.0)


class LiveStatusWatcher:
    """What `brainddpm train` shows while it waits for the training job: the job's live status file
    (losslog.LIVE_STATUS: step, loss, samples/s, ETA) as one line rewritten in place on a terminal (stdout), and
    as a log line every `every_s` seconds (the train rule's log). Reads only; a missing or half-written file
    shows nothing."""

    def __init__(self, path: Path, every_s: float = 60.0, stream=None) -> None:
        self.path, self.every_s = Path(path), every_s
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.seen: float | None = None
        self.logged_at = 0.0

    def line(self, state: dict) -> str:
        return (f"training: step {state['step']}/{state['total_steps']} (epoch {state['epoch']}), loss "
                f"{state['loss']:.4g}, {state['samples_per_s']:.3g} samples/s per process, "
                f"ETA {format_duration(state.get('eta_s'))}")

    def poll(self) -> str | None:
        """Show the newest state if it changed; returns the line shown (None when nothing new)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if state.get("time") == self.seen:
            return None
        self.seen = state.get("time")
        text = self.line(state)
        if self.terminal:
            self.stream.write("\r" + text.ljust(100))
            self.stream.flush()
        if time.monotonic() - self.logged_at >= self.every_s or state["step"] == state["total_steps"]:
            self.logged_at = time.monotonic()
            log.info("%s", text)
        return text

    def close(self) -> None:
        if self.terminal and self.seen is not None:
            self.stream.write("\n")
            self.stream.flush()


def wait_training(job: submitit.Job, squeue_every_s: float = 30.0, grace_s: float = 120.0,
                  out_dir: Path | None = None) -> dict:
    """Wait for the job; train.json's content from rank 0, or an error that names the job's logs.

    A SLURM job is also watched through squeue (`_wait_slurm_job`), so a job that ends without results
    fails the wait instead of hanging it where sacct does not answer. With `out_dir`, the run's progress
    (step, loss, samples/s, ETA) is shown while waiting: one line on a terminal, else a log line a minute.
    """
    watcher = LiveStatusWatcher(Path(out_dir) / "checkpoints" / LIVE_STATUS) if out_dir else None
    tick = watcher.poll if watcher else (lambda: None)
    try:
        if isinstance(job, submitit.SlurmJob):
            _wait_slurm_job(job, squeue_every_s, grace_s, tick)
        else:
            while not job.done():
                tick()
                time.sleep(1.0)
        tick()
        return job.results()[0]
    except (UncompletedJobError, BrainDDPMError, RuntimeError) as exc:
        raise BrainDDPMError(f"training job {job.job_id} failed: {str(exc).strip()[-2000:]}\n"
                             f"logs:\n{_log_paths(job)}") from None
    finally:
        if watcher:
            watcher.close()


def run_training(cfg: dict, shards_dir: Path, out_dir: Path, kind: str = "diffusion") -> dict:
    """Train the `kind` of model (diffusion or autoencoder, tasks.py) according to launch.executor and wait;
    returns train.json's content. Reruns resume."""
    check_kind(kind)  # before a job is submitted
    if cfg["launch"]["executor"] == "inprocess":
        check_launch(cfg, shards_dir)
        return train(cfg, Path(shards_dir), Path(out_dir), kind)
    return wait_training(submit_or_attach(cfg, shards_dir, out_dir, kind), out_dir=out_dir)
