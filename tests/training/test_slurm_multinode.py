"""Training across two SLURM nodes: the emulated 2-node cluster of tests/slurm/cluster.py (fixture
`slurm_two_nodes`: node1 and node2, each slurmd in its own network namespace with its own address on
a private bridge).

`brainddpm train` submits one job with `launch.nodes: 2`, one task per node (DDP, gloo).  The ranks
meet through submitit's environment (MASTER_ADDR = node1, resolved inside the nodes' namespaces), so
rank 1 reaches rank 0 only across the bridge; `GLOO_SOCKET_IFNAME` names the nodes' interface, as
real clusters name their fabric's (launch.setup).  Mid-run the job gets the time-limit signal (USR2,
what submitit's `--signal=USR2@<signal_delay_s>` asks SLURM to send): both ranks checkpoint, the job
requeues itself, and both nodes resume from that checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from brainddpm.training.checkpoint import find_latest
from brainddpm.training.launch import run_training
from helpers import launch_config, losses, make_shards

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 24


@pytest.fixture
def two_nodes(slurm_two_nodes, monkeypatch):
    """The test process talks to the 2-node cluster (sbatch, squeue, scancel in run_training)."""
    for k in list(__import__("os").environ):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_CONF", slurm_two_nodes.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_two_nodes.env["PATH"])
    return slurm_two_nodes


def test_two_nodes_rendezvous_requeue_and_resume(two_nodes, tmp_path):
    from slurm.cluster import IFACE

    shards = make_shards(tmp_path / "shards" / "train")
    out = tmp_path / "run"
    cfg = launch_config(run="two-nodes",
               train={"backend": "ddp", "micro_batch": 1, "max_steps": STEPS, "checkpoint_every": 4,
                      "keep_last": 2},
               launch={"executor": "slurm", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 1,
                       "partition": two_nodes.partition, "time_min": 10, "max_requeues": 2,
                       "setup": [f"export GLOO_SOCKET_IFNAME={IFACE}"]})
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(run_training(cfg, shards, out)), daemon=True)
    waiter.start()

    deadline = time.time() + 240
    signalled = None
    while waiter.is_alive() and time.time() < deadline:
        job = out / "job.json"
        if signalled is None and job.exists() and find_latest(out / "checkpoints") is not None:
            job_id = json.loads(job.read_text())["job_id"]
            if two_nodes.job_state(job_id) == "RUNNING" and len(losses(out, live=True)) < STEPS - 4:
                two_nodes.run("scancel", "--signal=USR2", job_id)
                signalled = {"job_id": job_id, "at_step": len(losses(out, live=True))}
        time.sleep(0.2)
    waiter.join(timeout=1)
    diag = f"\n{two_nodes.logs_tail(15)}\n" + "\n".join(
        p.read_text(errors="replace")[-1500:] for p in sorted((out / "slurm").glob("*.err")))
    assert not waiter.is_alive(), "training did not finish in 240 s" + diag
    assert result, "run_training failed" + diag
    assert signalled, "the job was never seen RUNNING with a checkpoint" + diag

    # one job, on both nodes, requeued once and resumed (the results come before the job has ended)
    assert two_nodes.wait_job(signalled["job_id"], timeout=60) == "COMPLETED"
    record = {r["job_id"]: r for r in two_nodes.job_records()}[signalled["job_id"]]
    assert record["state"] == "COMPLETED" and record["node_list"] == "node[1-2]", record
    assert record["requeues"] == 1 and len(record["runs"]) == 2, record
    assert result["world_size"] == 2 and result["requeues"] == 1, result
    assert 0 < result["resumed_from_step"] < STEPS, result
    # both ranks (one per node) ended with identical weights
    assert len(result["weights_sha256"]) == 2 and len(set(result["weights_sha256"])) == 1, result
    # every step logged exactly once, across the requeue
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    # each rank ran on its own node, before and after the requeue (submitit's per-task logs, appended
    # across the requeue); both checkpointed on the signal
    for rank in (0, 1):
        text = "".join(p.read_text(errors="replace")
                       for p in (out / "slurm").glob(f"{signalled['job_id']}_{rank}_log.*"))
        assert text.count(f"rank {rank} of 2 on node node{rank + 1},") == 2, text[-3000:]
        assert "preemption signal; checkpoint saved" in text, text[-3000:]
    # checkpoints written once: rank 0 the model and optimizer, each rank its own RNG state, nothing else
    saved = sorted(p for p in (out / "checkpoints").iterdir() if p.name not in ("loss.csv", "progress.json"))
    assert saved and all(p.name.startswith("step-") for p in saved), saved
    for step_dir in saved:
        names = sorted(p.name for p in step_dir.iterdir())
        assert names == ["manifest.json", "meta.json", "model.pt", "optimizer.pt", "rng-rank00000.pt",
                         "rng-rank00001.pt"], (step_dir, names)
    assert Path(out / "model.safetensors").stat().st_size > 0
