"""Inside one process: its device, its place in the process group, and the preemption signal.

`setup_runtime` is the first thing a training process does: it picks the device (cuda:LOCAL_RANK, or
the CPU), refuses to fall back to the CPU when GPUs were asked for, and joins the process group (NCCL
on GPUs, gloo on CPUs) from the rendezvous in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT: exported by submitit's TorchDistributedEnvironment in training/launch.py), with a
collective timeout so that a dead rank does not stall the others for long. (Which GPU a sampling or
feature job takes is device.py's `claim_gpu`.)

Preemption: on the signal (SIGUSR2, sent by SLURM or submitit before the time limit) every rank stops at the
next step boundary (`StopSignal`), the run checkpoints, and `stop_after_checkpoint` hands over to submitit's
handler, which requeues the job (launch.py); a rerun resumes from that checkpoint (checkpoint.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from brainddpm.errors import BrainDDPMError, ConfigError

log = logging.getLogger(__name__)


class TrainingInterrupted(BrainDDPMError):
    """Stopped by the preemption signal outside submitit; the checkpoint lets a rerun resume."""


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process created the process group, so it destroys it

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_cuda(gpus_per_node: int) -> None:
    """Raise a ConfigError naming the cause when GPUs were asked for and CUDA sees none."""
    if not gpus_per_node or torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        cause = (f"this torch {torch.__version__} is a CPU-only build; install the CUDA build "
                 "(README: 'Installing on a GPU cluster')")
    elif visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        cause = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
    else:
        cause = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: the NVIDIA driver "
                 "may be older than this CUDA build needs (compare `nvidia-smi` with the wheel's CUDA version), "
                 "or the job did not get a GPU node")
    raise ConfigError(f"config key 'launch.gpus_per_node': {gpus_per_node} GPU(s) per node requested, but {cause}. "
                      "Set launch.gpus_per_node: 0 to train on CPUs on purpose")


@contextmanager
def scoped_environment():
    """Undo, on leaving, every change made to os.environ inside: the rendezvous defaults set here and the
    variables Accelerate exports (RANK, LOCAL_WORLD_SIZE, ...), which would otherwise leak into later runs
    in the same process and into the jobs it submits."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def setup_logging() -> None:
    """INFO lines from the training modules, on a root handler of its own when the process has none."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("brainddpm.training").setLevel(logging.INFO)



def setup_runtime(backend: str, gpus_per_node: int = 0, timeout_s: int = 600) -> Runtime:
    """Pick the device and join the process group (call it inside `scoped_environment`).

    Without WORLD_SIZE in the environment the run is one process; it still joins a group of one for
    DeepSpeed, which needs one.
    """
    require_cuda(gpus_per_node)
    if "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())}
        os.environ.update({k: v for k, v in defaults.items() if k not in os.environ})
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and gpus_per_node:
        # training/launch.py leaves every GPU of the node visible, so this is cuda:LOCAL_RANK (what DeepSpeed and
        # Accelerate pick too); the modulo covers schedulers that bind one GPU per task.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one volume shape throughout: let cuDNN pick the fastest kernels
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # processes sharing this machine
        threads = max(1, len(os.sched_getaffinity(0)) // local_world)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # Accelerate would otherwise reset the thread count
    owns = False
    if (world_size > 1 or backend == "deepspeed") and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return Runtime(rank, world_size, local_rank, device, owns)


class StopSignal:
    """Turns the preemption signal into a flag that the training loop checks at step boundaries.

    Checkpointing inside the signal handler could interrupt a collective; the flag waits for a clean
    boundary, where the ranks agree on it and checkpoint together. `hand_over` then calls the handler
    installed before (submitit's: requeue on rank 0).
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

    def hand_over(self) -> bool:
        """Call the previous handler; False when there was none to call."""
        self.restore()
        if callable(self.prev):
            self.prev(self.signum, None)
            return True
        return False


def stop_after_checkpoint(stop: StopSignal, runtime: Runtime, step: int, checkpoints: Path) -> None:
    """After the stop checkpoint: hand over to submitit (rank 0 requeues and exits), or raise."""
    log.warning("rank %d: preemption signal; checkpoint saved at step %d", runtime.rank, step)
    # inside submitit, the previous handler is submitit's: on rank 0 it requeues and exits (or raises when
    # out of requeues); on the other ranks it returns, and they leave quietly
    if stop.hand_over() and runtime.rank != 0 and os.environ.get("SUBMITIT_EXECUTOR"):
        raise SystemExit(0)
    raise TrainingInterrupted(f"training stopped by signal at step {step}; the checkpoint in {checkpoints} "
                              "lets a rerun resume")


TEARDOWN_WATCH_S = 120  # a teardown still running after this dumps every thread's stack to stderr (the job log)


def leave_process_group(runtime: Runtime, succeeded: bool = True) -> None:
    """Destroy the process group this process created for several processes, the ranks together: a barrier
    first, as PyTorch advises (a rank that destroys while another still uses the group can hang it: seen once
    on the test cluster, rank 1 of a requeued job never returning after rank 0 had finished). After a failure
    the group is left to the process's exit instead (a destroy while another rank is in a collective
    deadlocks; torchtitan does the same). A teardown that takes over TEARDOWN_WATCH_S seconds dumps every
    thread's stack to stderr, so a hang names itself in the job's log. A group of one stays for later calls
    in this process: DeepSpeed caches its groups."""
    import faulthandler

    if not (runtime.owns_group and runtime.world_size > 1 and dist.is_initialized()) or not succeeded:
        return
    faulthandler.dump_traceback_later(TEARDOWN_WATCH_S, exit=False)
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()
