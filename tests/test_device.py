"""Which device a job runs on: GPU locks that give concurrent jobs on one machine a GPU each."""

from __future__ import annotations

import subprocess
import sys

from brainddpm.device import lock_first_free


def test_concurrent_jobs_claim_different_gpus(tmp_path):
    """The lock logic behind claim_gpu: each process takes the first free slot; a finished one frees it."""
    names = ["gpu-a", "gpu-b"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from brainddpm.device import "
         "lock_first_free; print(lock_first_free(['gpu-a', 'gpu-b'], Path(sys.argv[1])), flush=True); "
         "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert lock_first_free(names, tmp_path) == 1  # the other job's GPU is taken
        assert lock_first_free(names, tmp_path) is None  # every GPU held
    finally:
        holder.kill()
        holder.wait()
    assert lock_first_free(names, tmp_path / "fresh") == 0


def test_visible_gpus_counts_what_this_process_may_use():
    """The startup's GPU check (startup.check_training_gpus) counts the GPUs CUDA_VISIBLE_DEVICES leaves this
    process, as training will see them: none when it hides them all, on any machine."""
    import os

    import torch

    from brainddpm.device import visible_gpus

    assert visible_gpus() == torch.cuda.device_count()
    code = "from brainddpm.device import visible_gpus; print(visible_gpus())"
    hidden = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert hidden.stdout.strip() == "0"
