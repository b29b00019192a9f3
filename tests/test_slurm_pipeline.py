"""The whole workflow on the local SLURM test cluster, through profiles/ci-slurm (SLURM executor plugin).

One module-scoped fixture drives four Snakemake runs of the demo preset (shrunk further) with a latent
model (model.kind: latent, a tiny autoencoder), so that one DAG covers both models' stages: the data stage,
`train_autoencoder`, `encode` (one job per shard), `latent_index`, `train` on the latent shards, sampling that
decodes, the evaluation at image resolution, `reconstruction` and the report.  It runs against the session
cluster of tests/conftest.py (`slurm_cluster`, stopped at the end of the session):

1. The full DAG.  Every rule but the localrules is a SLURM job of the plugin (the shards and the
   bootstrap chunks as job arrays, as on LEONARDO); `train_autoencoder` and `train` are localrules under
   launch.executor: slurm and each submit a 2-task (DDP, gloo) submitit job, both named
   `brainddpm-train-<run>` (the autoencoder's files under results/autoencoder/<run>, the diffusion
   model's under results/train/<run>).  Once the diffusion model's job (the id in results/train/<run>/
   job.json) is RUNNING, has written a checkpoint and no job of the plugin is left in the queue, the test
   sends it the time-limit signal (`scancel --signal=USR2`, what submitit's
   `--signal=USR2@<launch.signal_delay_s>` asks SLURM to send): it must checkpoint, requeue and finish
   resumed.  At the same moment the login session "dies": Snakemake's whole process group (Snakemake and
   the `brainddpm train` waiting for the job) is killed.
2. The README's recovery ("My login session died"): `snakemake --unlock`, then the same command.  The
   rerun must attach to the training job still in the queue (no second training job).  A fault injected
   into one sampling job (a `brainddpm` wrapper first on PATH fails `brainddpm sample --sampler ddim
   --part 1` while a flag file exists) makes this run fail on the cluster: Snakemake must name that
   job's SLURM log.
3. The same command after removing the fault: it resumes at the failed job (that sampling part and what
   depends on it) and redoes nothing that finished, either training included.
4. The same command again: nothing to be done, no new SLURM job.

Then two dry runs: switching autoencoder.use_checkpoint (memory, not results) plans nothing.

About 8.5 minutes on 2 cores shared with other work (this module alone: fixture 496 and 515 s, module 506 and
531 s in two runs; the pixel-only module and the latent DAG's module it replaced took 500 + 413 s of fixture,
508 + 426 s in all, the same way), most of it the plugin's status polling: after each query that finds no
job finished it waits 10 s longer (queries at 2, 14, 36, 68 s with profiles/ci-slurm), so a sequential
step costs 14 s while a SLURM job (two Snakemake starts plus the command) takes under ~13 s, and 36 s
when it takes longer (the demo cohort, ~55 s of command, 68 s).  On failure the assertion messages carry
the Snakemake output tail, the job records and the tails of the logs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from slurm.cluster import FINAL_STATES

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUN = "demo"
SAMPLER = "ddim"
# the diffusion model's training (latent: ~0.1-0.2 s a step on CPU): enough steps after the first checkpoint
# for the test to see it and signal the job before the loop ends
MAX_STEPS = 40
CHECKPOINT_EVERY = 4
LATENT_SHAPE = [2, 8, 8, 8]  # the tiny autoencoder's latents of a 24x32x24 volume (padded to 32^3, 4x)
FAIL_PART = 1  # the sampling part whose job the injected fault breaks in run 1
# Rules that run as SLURM jobs of the plugin.  Not here, by design: `train` and `train_autoencoder`
# (localrules when launch.executor is slurm, workflow/rules/train.smk and latent.smk: each submits and
# watches its training job, whose own records are checked separately), `fetch_fid_weights` and
# `fetch_perceptual_weights` (localrules that download; not needed with evaluate.fid.weights: null and
# autoencoder.perceptual.weight: 0), and the input-only target rules (`all`), which Snakemake runs itself.
SLURM_RULES = {"demo_cohort", "manifest", "qc", "split", "shard", "shard_index", "mask_rule", "encode",
               "latent_index", "sample_part", "features", "bootstrap", "gather_metrics", "memorization",
               "realism_probe", "reconstruction", "report"}
# rules with one job per wildcard value (the others: one job)
PER_WILDCARD_RULES = {"shard", "shard_index", "encode", "latent_index", "sample_part", "bootstrap"}
# rules the profile submits as job arrays (profiles/ci-slurm: slurm-array-jobs)
ARRAY_RULES = {"shard", "bootstrap"}
# what run 3 redoes after the failed sampling part: that part and everything downstream of it (not
# `reconstruction`, which only needs the autoencoder and the validation shards)
RESUMED_RULES = {"sample_part", "features", "bootstrap", "gather_metrics", "memorization", "realism_probe", "report"}


def overrides(tmp: Path) -> dict:
    """The demo preset, smaller still, as a latent model with a tiny autoencoder; both trainings 2-task
    submitit SLURM jobs."""
    demo = tmp / "demo"
    return {
        "results": str(tmp / "results"),
        "run": RUN,
        "demo": {"enabled": True, "n": 8, "seed": 0, "out": str(demo)},
        "datasets": [{"name": s, "root": str(demo / s), "participants": str(demo / "participants.tsv")}
                     for s in ("siteA", "siteB", "siteC")],
        "data": {"volumes_per_shard": 4, "val_fraction": 0.5},  # >= 4 validation volumes for the metrics
        "model": {"kind": "latent"},  # the demo's UNet on 2x8x8x8 latents (24x32x24 padded to 32^3, 4x)
        "autoencoder": {"channels": [4, 8, 8], "latent_channels": 2, "num_res_blocks": 1,
                        "attention_levels": [False, False, False], "norm_num_groups": 4, "use_checkpoint": False,
                        "pad_multiple": 16, "patch": None, "adversarial": {"weight": 0.0},
                        "train": {"max_steps": 4, "micro_batch": 1, "checkpoint_every": 2}},
        "decode": {"roi": [4, 4, 4], "overlap": 0.25, "sw_batch_size": 2},  # sliding windows, as on small GPUs
        "scheduler": {"num_train_timesteps": 50, "kind": "ddpm"},  # a DDPM: the ddim sampler
        # ddp (not deepspeed): no DeepSpeed import or op build in the two tasks, same gloo rendezvous
        "train": {"backend": "ddp", "epochs": 100, "max_steps": MAX_STEPS, "micro_batch": 1,
                  "checkpoint_every": CHECKPOINT_EVERY, "keep_last": 2, "log_every": 5, "num_workers": 0},
        "launch": {"executor": "slurm", "account": False,  # the test cluster has no accounts
                   "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 1,
                   "partition": "debug", "time_min": 20, "signal_delay_s": 30, "max_requeues": 2},
        "sample": {"n": 4, "batch": 2, "jobs": 2, "samplers": [SAMPLER], "ddim_steps": 10},
        "evaluate": {"n": 4, "bootstrap": 50, "jobs": 2, "fid": {"weights": None}},
    }


FAULT_WRAPPER = """#!/bin/sh
# Written by tests/test_slurm_pipeline.py: fault injection.  While {flag} exists,
# `brainddpm sample --sampler {sampler} ... --part {part}` fails; everything else is the real brainddpm.
if [ "$1" = sample ] && [ -e "{flag}" ]; then
  case " $* " in
    *" --sampler {sampler} "*"--part {part} "*)
      echo "injected failure (tests/test_slurm_pipeline.py) in job $SLURM_JOB_ID" >&2; exit 3 ;;
  esac
fi
exec "{real}" "$@"
"""


# --------------------------------------------------------------------------- diagnostics


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({e})"


def _records_table(records) -> str:
    rows = [f"{'job':>6} {'state':<10} {'exit':<6} {'rq':>2}  name / comment"]
    for r in records:
        rows.append(f"{r['job_id']:>6} {r.get('state')!s:<10} {r.get('exit_code')!s:<6} "
                    f"{r.get('requeues', 0):>2}  {r.get('name')} / {r.get('comment')}")
    return "\n".join(rows)


class Pipeline:
    """What the runs left behind, for the tests and for diagnostics."""

    def __init__(self, cluster, tmp: Path):
        self.cluster, self.tmp = cluster, tmp
        self.res = tmp / "results"
        self.train_dir = self.res / "train" / RUN  # the diffusion model's training
        self.ae_dir = self.res / "autoencoder" / RUN  # the autoencoder's
        self.slurm_logdir = tmp / "slurm_logs"
        self.over = tmp / "overrides.yaml"
        self.over.write_text(yaml.safe_dump(overrides(tmp)))
        self.flag = tmp / "fail-sample-part"
        self.bin = tmp / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "brainddpm"
        wrapper.write_text(FAULT_WRAPPER.format(flag=self.flag, sampler=SAMPLER, part=FAIL_PART,
                                                real=Path(sys.executable).parent / "brainddpm"))
        wrapper.chmod(0o755)
        # jobs inherit this environment (sbatch --export=ALL): the wrapper comes first on their PATH too
        self.env = {**cluster.env, "PATH": f"{self.bin}{os.pathsep}{cluster.env['PATH']}"}
        self.runs: list[dict] = []  # per run: rc, output, log, new job ids
        self.kill: dict = {}

    def cmd(self, *extra: str, over: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "snakemake", "--profile", "profiles/ci-slurm",
                "--slurm-logdir", str(self.slurm_logdir),
                "--configfile", "config/config.yaml", "config/demo.yaml", str(over or self.over), *extra]

    def unlock(self) -> None:
        """What the README says to do first after a killed Snakemake: it leaves its lock behind."""
        proc = subprocess.run(self.cmd("--unlock"), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def records(self, ids=None) -> list[dict]:
        recs = self.cluster.job_records()
        return recs if ids is None else [r for r in recs if r["job_id"] in ids]

    def diagnostics(self, run: int | None = None) -> str:
        out = []
        for i, r in enumerate(self.runs, 1):
            if run is None or i == run:
                out.append(f"===== snakemake run {i} (rc={r['rc']}), output tail =====\n{r['output'][-4000:]}")
        out.append("===== job records =====\n" + _records_table(self.records()))
        for log in sorted(self.slurm_logdir.rglob("*.log")) if self.slurm_logdir.exists() else []:
            rec = next((x for x in self.records() if x["job_id"] == log.stem), None)
            if rec is None or rec.get("state") != "COMPLETED":
                out.append(f"===== {log} =====\n{_tail(log)}")
        logs = [self.res / "logs" / "train" / f"{RUN}-autoencoder.log", *sorted((self.ae_dir / "slurm").glob("*.err")),
                self.res / "logs" / "train" / f"{RUN}.log", *sorted((self.train_dir / "slurm").glob("*.err"))]
        for log in logs:
            if log.exists():
                out.append(f"===== {log} =====\n{_tail(log, 25)}")
        out.append("===== cluster daemons =====\n" + self.cluster.logs_tail(10))
        return "\n".join(out)

    def run(self, timeout: float, on_poll=None) -> dict:
        """One Snakemake run in the background (so that on_poll(process) can watch the cluster); waits for it.
        Snakemake gets its own session, like a login shell: on_poll may kill the whole process group."""
        before = {r["job_id"] for r in self.records()}
        log = self.tmp / f"snakemake-{len(self.runs) + 1}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(self.cmd(), cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            deadline = time.time() + timeout
            try:
                while p.poll() is None and time.time() < deadline:
                    if on_poll is not None:
                        on_poll(p)
                    time.sleep(0.5)
            finally:
                if p.poll() is None:  # too slow: stop Snakemake (it cancels its SLURM jobs)
                    p.terminate()
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
        result = {"rc": p.returncode, "output": log.read_text(errors="replace"), "log": log,
                  "elapsed_s": round(time.time() - deadline + timeout),
                  "timed_out": time.time() >= deadline,
                  "new": {r["job_id"] for r in self.records()} - before}
        self.runs.append(result)
        if result["timed_out"]:
            raise AssertionError(f"snakemake run {len(self.runs)} took more than {timeout:.0f}s\n"
                                 + self.diagnostics(len(self.runs)))
        return result

    # ------------------------------------------------------------------ the kill
    def training_jobs(self, ids=None) -> list[dict]:
        """Both trainings' submitit jobs (the autoencoder's and the diffusion model's have one name)."""
        return [r for r in self.records(ids) if r.get("name") == f"brainddpm-train-{RUN}"]

    @staticmethod
    def recorded_job_id(out_dir: Path) -> str | None:
        """The training job that `brainddpm train[-autoencoder]` submitted into out_dir (its job.json)."""
        try:
            return json.loads((out_dir / "job.json").read_text())["job_id"]
        except (OSError, ValueError, KeyError):  # not submitted yet (the file is written atomically)
            return None

    def maybe_kill(self, snakemake: subprocess.Popen) -> None:
        """Once the diffusion model's training job runs and has a valid checkpoint, and no job of the plugin
        is left in the queue (none is then cut off by the kill and redone by the rerun): the time-limit
        signal to it, once, and the login session dies: Snakemake and everything it started locally (the
        waiting `brainddpm train`) are SIGKILLed, with no chance to cancel or clean up anything."""
        from brainddpm.training.checkpoint import find_latest

        if self.kill:
            return
        job_id = self.recorded_job_id(self.train_dir)  # not the autoencoder's job, which has the same name
        if job_id is None:
            return
        recs = self.records()
        job = next((r for r in recs if r["job_id"] == job_id), None)
        if job is None or job.get("state") != "RUNNING":
            return
        if any(_rule(r) and r.get("state") not in FINAL_STATES for r in recs):
            return
        latest = find_latest(self.train_dir / "checkpoints")
        if latest is None:
            return
        r = self.cluster.run("scancel", "--signal=USR2", job["job_id"], check=False)
        os.killpg(snakemake.pid, signal.SIGKILL)
        self.kill = {"job_id": job["job_id"], "checkpoint_step": int(latest.name.split("-")[1]),
                     "live_loss_steps": _loss_steps(self.train_dir / "checkpoints" / "loss.csv"),  # the live log
                     "rc": r.returncode, "stderr": r.stderr}


def _loss_steps(path: Path) -> list[int]:
    """The step column of loss.csv ([] while it is missing or caught mid-write)."""
    try:
        with open(path, newline="") as f:
            return [int(row[0]) for row in list(csv.reader(f))[1:] if row]
    except (OSError, ValueError, IndexError, csv.Error):
        return []


def _rule(record) -> str | None:
    c = record.get("comment") or ""
    return c[len("rule_"):].split("_wildcards_")[0] if c.startswith("rule_") else None


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def pipeline(slurm_cluster, tmp_path_factory):
    p = Pipeline(slurm_cluster, tmp_path_factory.mktemp("slurm-pipeline"))
    p.flag.touch()  # one sampling job will fail (run 2)
    # run 1: the whole DAG; the diffusion model's training signalled mid-run, and Snakemake killed at that moment
    r1 = p.run(timeout=600, on_poll=p.maybe_kill)
    if not p.kill or r1["rc"] != -signal.SIGKILL:
        raise AssertionError(f"run 1 should have been killed mid-training (rc={r1['rc']})\n" + p.diagnostics(1))
    # run 2: unlock and rerun; attaches to the training job, then fails at the injected fault
    p.unlock()
    r2 = p.run(timeout=480)
    # what run 3 must leave alone: both trainings' outputs, the latents, the reconstruction
    kept = ([p.train_dir / name for name in ("train.json", "model.safetensors", "loss.csv")]
            + [p.ae_dir / name for name in ("train.json", "autoencoder.safetensors", "loss.csv")]
            + [p.res / "latents" / RUN / split / "index.json" for split in ("train", "val")]
            + [p.res / "eval" / RUN / "reconstruction.json"])
    p.after_train = {path: path.stat().st_mtime_ns for path in kept if path.exists()}
    p.train_log_text = _tail(p.res / "logs" / "train" / f"{RUN}.log", 200)
    p.failed_rule_log = p.res / "logs" / "sample" / f"{RUN}-{SAMPLER}-{FAIL_PART:03d}.log"
    p.failed_rule_log_text = p.failed_rule_log.read_text(errors="replace") if p.failed_rule_log.exists() else ""
    if r2["rc"] == 0 or len(p.after_train) != len(kept):
        raise AssertionError(f"run 2 should have finished training and the latent stages, then failed at the "
                             f"injected fault (missing: {sorted(map(str, set(kept) - set(p.after_train)))}, "
                             f"rc={r2['rc']})\n" + p.diagnostics(2))
    # run 3: fault removed; resumes at the failed job
    p.flag.unlink()
    p.run(timeout=360)
    # run 4: nothing left
    p.run(timeout=120)
    return p


def test_pipeline_finishes_with_a_report(pipeline):
    r3 = pipeline.runs[2]
    assert r3["rc"] == 0, "the resumed run failed\n" + pipeline.diagnostics(3)
    report = pipeline.res / "report"
    for name in ("report.md", "metrics.md", "metrics.json", "slices.png", "memorization.png"):
        assert (report / name).stat().st_size > 100, name
    assert "FID was not computed" in (report / "report.md").read_text()
    parts = sorted((pipeline.res / "samples" / RUN / SAMPLER).glob(f"nifti-*/*_{SAMPLER}.nii.gz"))
    masks = sorted((pipeline.res / "samples" / RUN / SAMPLER).glob(f"nifti-*/*_{SAMPLER}_mask.nii.gz"))
    assert len(parts) == len(masks) == 4, parts


def test_every_stage_ran_as_a_slurm_job(pipeline):
    ids = set().union(*(r["new"] for r in pipeline.runs))
    recs = pipeline.records(ids)
    by_rule: dict[str, list[dict]] = {}
    for r in recs:
        if _rule(r):
            by_rule.setdefault(_rule(r), []).append(r)
    diag = "\n" + _records_table(recs)
    assert set(by_rule) == SLURM_RULES, diag
    for rule, jobs in by_rule.items():
        assert any(j["state"] == "COMPLETED" and j["exit_code"] == "0:0" for j in jobs), rule + diag
        assert all(j["partition"] == "debug" and j["work_dir"] == str(ROOT) for j in jobs), rule + diag
    # one job per wildcard value: shards of both splits, sampling parts, bootstrap chunks
    index = {s: json.loads((pipeline.res / "shards" / s / "index.json").read_text()) for s in ("train", "val")}
    n_shards = sum(len(i["shards"]) for i in index.values())
    completed = {rule: [j for j in jobs if j["state"] == "COMPLETED"] for rule, jobs in by_rule.items()}
    assert len(completed["shard"]) == n_shards, diag
    assert len(completed["shard_index"]) == 2, diag  # train, val
    assert len(completed["sample_part"]) == 2 and len(completed["bootstrap"]) == 2, diag
    latent_shards = {s: sorted((pipeline.res / "latents" / RUN / s).glob("shard-*.h5")) for s in ("train", "val")}
    assert len(completed["encode"]) == n_shards == sum(map(len, latent_shards.values())), diag  # one per shard
    assert len(completed["latent_index"]) == 2, diag  # train, val
    assert all(len(completed[r]) == 1 for r in SLURM_RULES - PER_WILDCARD_RULES), diag
    # `train_autoencoder` and `train` are localrules: no plugin job; each training is a submitit job of its
    # own, the autoencoder's first (the ids recorded in each output folder's job.json)
    train_jobs = pipeline.training_jobs(ids)
    ae_id, diffusion_id = Pipeline.recorded_job_id(pipeline.ae_dir), Pipeline.recorded_job_id(pipeline.train_dir)
    assert [j["job_id"] for j in train_jobs] == [ae_id, diffusion_id], diag
    assert all(j["state"] == "COMPLETED" and j["exit_code"] == "0:0" for j in train_jobs), diag
    ae_info = json.loads((pipeline.ae_dir / "train.json").read_text())
    assert ae_info["kind"] == "autoencoder" and ae_info["world_size"] == 2 and ae_info["steps"] == 4, ae_info
    # the many small jobs went as job arrays: one sbatch call per rule and ready batch
    for rule in ARRAY_RULES:
        tasks = completed[rule]
        assert all(t["array_job_id"] for t in tasks), rule + diag
        assert len({t["array_job_id"] for t in tasks}) < len(tasks), rule + diag
    # every job of the plugin left its log where the profile keeps it (%A_%a.log for array tasks)
    for r in recs:
        if _rule(r):
            name = f"{r['array_job_id']}_{r['array_task_id']}" if r.get("array_task_id") else r["job_id"]
            assert list(pipeline.slurm_logdir.glob(f"rule_{_rule(r)}/**/{name}.log")), r


def test_killed_training_checkpoints_requeues_and_resumes(pipeline):
    kill, diag = pipeline.kill, "\n" + pipeline.diagnostics(2)
    assert kill, "the training job was never seen RUNNING with a checkpoint" + diag
    assert kill["rc"] == 0, kill
    info = json.loads((pipeline.train_dir / "train.json").read_text())
    assert info["steps"] == MAX_STEPS and info["world_size"] == 2 and info["backend"] == "ddp", info
    assert info["requeues"] >= 1, f"{info}\n{kill}{diag}"
    # resumed mid-run from the checkpoint written on the signal: at or after the newest periodic checkpoint
    # that existed when the signal was sent
    assert 0 < kill["checkpoint_step"] <= info["resumed_from_step"] < MAX_STEPS, f"{info}\n{kill}"
    assert len(set(info["weights_sha256"])) == 1, info  # the two ranks ended with the same weights
    assert _loss_steps(pipeline.train_dir / "loss.csv") == list(range(1, MAX_STEPS + 1))
    job, = pipeline.training_jobs({kill["job_id"]})
    assert job["job_id"] == Pipeline.recorded_job_id(pipeline.train_dir)  # the diffusion model's, not the autoencoder's
    assert job["state"] == "COMPLETED" and job["requeues"] >= 1, job
    assert len(job["runs"]) >= 2 and job["runs"][-1]["state"] == "COMPLETED", job  # jobcomp: one line per run
    logs = "".join(p.read_text(errors="replace") for p in (pipeline.train_dir / "slurm").glob(f"{kill['job_id']}_*"))
    assert "preemption signal; checkpoint saved" in logs and "requeuing training" in logs, logs[-3000:]


def test_rerun_after_the_login_session_died_attaches_to_the_training_job(pipeline):
    """Snakemake was killed while the training job ran: the rerun waited for that same job (one training
    job id for the whole run, see test_every_stage_ran_as_a_slurm_job) and trained nothing itself."""
    kill = pipeline.kill
    assert f"attaching to training job {kill['job_id']}" in pipeline.train_log_text, pipeline.train_log_text
    assert json.loads((pipeline.train_dir / "job.json").read_text())["job_id"] == kill["job_id"]
    for out in (pipeline.train_dir, pipeline.ae_dir):  # one submission of each training, none by the reruns
        submissions = list((out / "slurm").glob("*_submission.sh"))
        assert len(submissions) == 1, submissions
    ids = set().union(*(r["new"] for r in pipeline.runs))
    ae_id = Pipeline.recorded_job_id(pipeline.ae_dir)
    assert [r["job_id"] for r in pipeline.training_jobs(ids)] == [ae_id, kill["job_id"]]
    assert int(ae_id) < int(kill["job_id"]) and pipeline.runs[0]["new"] >= {ae_id, kill["job_id"]}


def test_failed_job_names_its_slurm_log(pipeline):
    r2 = pipeline.runs[1]
    failed = [r for r in pipeline.records(r2["new"]) if r["state"] == "FAILED"]
    assert len(failed) == 1 and _rule(failed[0]) == "sample_part", _records_table(pipeline.records(r2["new"]))
    assert failed[0]["comment"] == f"rule_sample_part_wildcards_{SAMPLER}_{FAIL_PART:03d}", failed[0]
    job_id = failed[0]["job_id"]
    logs = list(pipeline.slurm_logdir.glob(f"rule_sample_part/**/{job_id}.log"))
    assert len(logs) == 1, sorted(pipeline.slurm_logdir.rglob("*.log"))
    out = r2["output"]
    # Snakemake's error report for the job: the SLURM job id and state, the rule's log and the SLURM log
    assert "Error in rule sample_part:" in out, out[-4000:]
    error = out[out.index("Error in rule sample_part:"):]
    error = error[:error.index("external_jobid:") + 40] if "external_jobid:" in error else error[:3000]
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'FAILED'" in error, error
    log_line = next((line for line in error.splitlines() if line.strip().startswith("log:")), "")
    assert str(pipeline.failed_rule_log) in log_line and str(logs[0]) in log_line, error
    assert f"external_jobid: {job_id}" in error, error
    # the rule's log (as run 2 left it; run 3 rewrote it) has the failing command's stderr,
    # the SLURM log the job step's (Snakemake inside the job) report
    assert f"injected failure (tests/test_slurm_pipeline.py) in job {job_id}" in pipeline.failed_rule_log_text
    assert "Error in rule sample_part:" in logs[0].read_text(errors="replace")
    # the part that did not fail was finished before Snakemake stopped
    assert (pipeline.res / "samples" / RUN / SAMPLER / f"part-{1 - FAIL_PART:03d}.h5").exists()


def test_rerun_resumes_without_redoing_finished_stages(pipeline):
    r3 = pipeline.runs[2]
    recs = pipeline.records(r3["new"])
    diag = "\n" + _records_table(recs) + "\n" + r3["output"][-3000:]
    assert r3["rc"] == 0, diag
    assert {_rule(r) for r in recs} == RESUMED_RULES, diag  # no cohort, manifest, split, shard, training job
    sample_jobs = [r for r in recs if _rule(r) == "sample_part"]
    assert len(sample_jobs) == 1 and f"_{FAIL_PART:03d}" in sample_jobs[0]["comment"], diag
    assert pipeline.training_jobs(r3["new"]) == [], diag  # neither training
    now = {path: path.stat().st_mtime_ns for path in pipeline.after_train}
    assert now == pipeline.after_train  # both trainings' outputs, the latents and the reconstruction untouched


def test_rerun_of_a_finished_pipeline_does_nothing(pipeline):
    r4 = pipeline.runs[3]
    assert r4["rc"] == 0 and "Nothing to be done" in r4["output"], r4["output"][-3000:]
    assert not r4["new"], _records_table(pipeline.records(r4["new"]))
    # no job of ours is left queued or running on the cluster
    left = pipeline.cluster.run("squeue", "-h", "-o", "%i %j %T %k").stdout.strip()
    assert not left, left


# --------------------------------------------------------------------------- the latent model's stages


def test_latent_outputs_agree_on_the_scale_factor(pipeline):
    """The autoencoder, the latent shards and the diffusion model carry one scale factor; the report has the
    reconstruction section (sliding-window decoding) and the reconstruction metrics."""
    from brainddpm.models.autoencoder import load_autoencoder
    from brainddpm.models.final import read_final

    res = pipeline.res
    assert pipeline.runs[2]["rc"] == 0, pipeline.diagnostics(3)
    _, ae = load_autoencoder(pipeline.ae_dir / "autoencoder.safetensors")
    for split in ("train", "val"):
        index = json.loads((res / "latents" / RUN / split / "index.json").read_text())
        assert index["latent"]["scale_factor"] == ae["scale_factor"], (split, index["latent"], ae)
        assert index["latent"]["latent_shape"] == LATENT_SHAPE, (split, index["latent"])
    model, _ = read_final(pipeline.train_dir / "model.safetensors", tensors=False)
    assert model["data"]["scale_factor"] == ae["scale_factor"] and model["data"]["target_shape"] == [24, 32, 24]
    report = (res / "report" / "report.md").read_text()
    assert "## Reconstruction (autoencoder of the latent model)" in report and "windows of 4x4x4" in report
    recon = json.loads((res / "eval" / RUN / "reconstruction.json").read_text())
    assert recon["n"] >= 4 and {"psnr", "ssim", "mae"} <= set(recon["metrics"])


def test_activation_checkpointing_is_no_rerun_trigger(pipeline):
    """Switching autoencoder.use_checkpoint (memory, not results) after the run plans nothing; the dry run still
    hands the new value to the autoencoder's job (a resource, not a parameter).  Dry runs: no job, no change."""
    assert pipeline.runs[3]["rc"] == 0, pipeline.diagnostics(4)
    changed = overrides(pipeline.tmp)
    changed["autoencoder"]["use_checkpoint"] = True
    over = pipeline.tmp / "checkpointing.yaml"
    over.write_text(yaml.safe_dump(changed))
    proc = subprocess.run(pipeline.cmd("-n", over=over), cwd=ROOT, env=pipeline.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    proc = subprocess.run(pipeline.cmd("-n", "--forcerun", "train_autoencoder", over=over), cwd=ROOT,
                          env=pipeline.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--use-checkpoint true" in proc.stdout + proc.stderr, proc.stdout[-3000:]
