"""How training runs: the processes, their devices and rendezvous, preemption, and submission.

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

import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import submitit
from submitit.core.utils import UncompletedJobError

from .checkpoint import read_requeues, write_requeues
from .config import validate_config
from .errors import BadInputError, BrainDDPMError, ConfigError

log = logging.getLogger(__name__)



class TrainingInterrupted(BrainDDPMError):
    """Stopped by the preemption signal outside submitit; the checkpoint lets a rerun resume."""


# ---- inside each process: rendezvous, device, preemption signal ----

@dataclass
class Dist:
    """This process's place in the run."""
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this process created the process group, so it destroys it

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(backend: str) -> tuple[Dist, list[str]]:
    """Pick the device (cuda:LOCAL_RANK, or CPU) and join the process group (NCCL on GPU, gloo on CPU).

    Without WORLD_SIZE in the environment the run is one process; it still joins a group of one for
    DeepSpeed, which needs one. Returns the environment variables set here, for the caller to remove.
    """
    added = []
    if "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(_free_port())}
        added = [k for k in defaults if k not in os.environ]
        os.environ.update({k: defaults[k] for k in added})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # TrainJob leaves every GPU of the node visible, so this is cuda:LOCAL_RANK (what DeepSpeed picks too);
        # the modulo covers schedulers that bind one GPU per task.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one volume shape throughout: let cuDNN pick the fastest kernels
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes sharing this machine's cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    owns = False
    if (world > 1 or backend == "deepspeed") and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return Dist(rank, world, device, owns), added


class StopSignal:
    """Turns the preemption signal into a flag that the training loop checks at step boundaries.

    Checkpointing inside the signal handler could interrupt a collective; the flag waits for a clean
    boundary, where the ranks agree on it and checkpoint together. `forward` then hands the signal to the
    handler installed before (submitit's: requeue on rank 0).
    """

    def __init__(self) -> None:
        self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        self.flag, self.prev, self.installed = False, None, False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(self.signum, self._handle)
            self.installed = True

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(self.signum, self.prev)
            self.installed = False

    def forward(self) -> bool:
        """Call the previous handler; False when there was none to call."""
        self.restore()
        if callable(self.prev):
            self.prev(self.signum, None)
            return True
        return False


# ---- before submission: checks, executors ----

def tasks_per_node(launch: dict) -> int:
    """Processes per node: launch.tasks_per_node, else one per GPU, else one."""
    return launch["tasks_per_node"] or launch["gpus_per_node"] or 1


def _train_split_size(shards_dir: Path) -> int:
    from .train import split_dir

    index = split_dir(Path(shards_dir)) / "index.json"
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
        "setup": list(lc["setup"]), "additional_parameters": dict(lc["slurm_extra"]),
    }
    if lc["gpus_per_node"]:
        params["gpus_per_node"] = lc["gpus_per_node"]
    params.update({k: lc[k] for k in ("partition", "account", "qos") if lc[k] is not None})
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
                               signal_delay_s=lc["signal_delay_s"])
    return executor


# ---- the submitted job ----

class TrainJob(submitit.helpers.Checkpointable):
    """What every task of the job runs; on preemption/timeout submitit calls `checkpoint` (rank 0)."""

    def __init__(self, cfg: dict, shards_dir: Path, out_dir: Path) -> None:
        self.cfg, self.shards_dir, self.out_dir = cfg, str(shards_dir), str(out_dir)

    def __call__(self) -> dict:
        from .train import train

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; every GPU of the node stays visible (see setup_distributed)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return train(self.cfg, Path(self.shards_dir), Path(self.out_dir))

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


def submit_training(cfg: dict, shards_dir: Path, out_dir: Path) -> submitit.Job:
    """Check the config, then submit the training job (local or slurm executor); returns the job."""
    check_launch(cfg, shards_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_requeues(out_dir, {**read_requeues(out_dir), "submission": 0})
    job = make_executor(cfg, out_dir).submit(TrainJob(cfg, Path(shards_dir).resolve(), out_dir.resolve()))
    print(f"submitted training job {job.job_id} ({cfg['launch']['executor']}); logs:\n{_log_paths(job)}",
          file=sys.stderr, flush=True)
    return job


def wait_training(job: submitit.Job) -> dict:
    """Wait for the job; train.json's content from rank 0, or an error that names the job's logs."""
    try:
        return job.results()[0]
    except (UncompletedJobError, BrainDDPMError, RuntimeError) as exc:
        raise BrainDDPMError(f"training job {job.job_id} failed: {str(exc).strip()[-2000:]}\n"
                             f"logs:\n{_log_paths(job)}") from None


def run_training(cfg: dict, shards_dir: Path, out_dir: Path) -> dict:
    """Train according to launch.executor and wait; returns train.json's content. Reruns resume."""
    if cfg["launch"]["executor"] == "inprocess":
        check_launch(cfg, shards_dir)
        from .train import train

        return train(cfg, Path(shards_dir), Path(out_dir))
    return wait_training(submit_training(cfg, shards_dir, out_dir))
