"""A throw-away one-node SLURM cluster on localhost, for the tests.

Usage (plain Python, no pytest needed; in the tests use the session fixture
``slurm_cluster`` of tests/conftest.py, which does this and skips or fails)::

    sys.path.insert(0, "tests"); from slurm import cluster as slurm

    reason = slurm.ensure_installed()       # None, or why SLURM cannot be had
    c = slurm.start("/tmp/somewhere")       # munged + slurmctld + slurmd
    subprocess.run(["sbatch", "--wrap", "true"], env=c.env, check=True)
    c.sbatch("--wrap", "true"); c.wait_job(job_id)   # helpers
    ...
    slurm.job_records(c)                    # every job this cluster ran (= c.job_records())
    c.stop()                                # nothing is left running

Design (Debian 12's SLURM 22.05, munge 0.5.15; as root, in a container or VM,
with no systemd and no cgroup plugins):

* Everything lives in the caller's directory: slurm.conf, the munge key and
  socket, state, spool, logs, the job-completion file.  No file under /etc is
  written and no system service is started; the clients find the cluster
  through ``SLURM_CONF`` (in ``Cluster.env``), and the munge socket through
  ``AuthInfo=socket=...`` in that slurm.conf.  One exception: a symlink
  /run/slurm/conf/slurm.conf -> <workdir>/slurm.conf (removed by stop()),
  because the Snakemake plugin's job step drops SLURM_CONF before it calls
  srun inside the job (see _claim_run_conf).  So one test cluster per machine
  at a time, and none where /etc/slurm/slurm.conf exists.
* The daemons run as root in the foreground (``-D`` / ``-F``) as children of
  this process (own session), on free TCP ports picked at start; stop() (also
  registered with atexit) cancels the jobs, stops them, and kills any
  slurmstepd or job process left over.
* No cgroups: ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``JobAcctGatherType=jobacct_gather/none``.  Memory is not a consumable
  resource (``SelectTypeParameters=CR_CPU``): ``--mem`` is checked against
  RealMemory but never enforced.
* ``SlurmdParameters=config_overrides``: slurmd trusts the configured CPU
  count and memory instead of probing the hardware, so the node can advertise
  more CPUs than the machine has (see ``start(cpus=...)``).
* No slurmdbd (it needs MariaDB): ``AccountingStorageType=accounting_storage/none``.
  Job records come from two places: ``JobCompType=jobcomp/filetxt`` appends a
  line to ``<workdir>/jobcomp.txt`` every time a job ends (also each time a
  job is requeued), and ``MinJobAge`` (1 h) keeps finished jobs in slurmctld,
  so ``scontrol show job`` / ``squeue --states=all`` still show them (with
  their ``Comment``, which the Snakemake SLURM plugin sets to ``rule_<name>``,
  and ``Restarts``, the requeue count).  Plain ``sacct`` does not work here
  (``sacct --completion`` reads the jobcomp file); the Snakemake plugin must
  use ``status_command: squeue`` (profiles/ci-slurm) and submitit, whose
  watcher calls ``sacct``, falls back on its result files (it logs
  "Bypassing sacct error").
* ``AuthInfo=...,cred_expire=10``: a requeued job may start again after 10 s
  instead of the default 120 s.

Several nodes (``start(..., nodes=2)``): emulated with Linux network
namespaces, so that each slurmd has an address of its own and a multi-node job
really crosses a network (facts behind this design:
../shared/notes/multinode-slurm-on-one-machine.md).  ``PrivateNetwork``
creates a bridge with a private /24 in the root namespace and one namespace
per node, each with a veth interface of the same name (``IFACE``: one
``GLOO_SOCKET_IFNAME`` fits all nodes) and its own address; nothing is routed
anywhere else.  Each slurmd runs ``nsenter --net=/run/netns/<ns>`` (not ``ip
netns exec``, which remounts /sys and breaks slurmd) inside a private mount
namespace whose /etc/hosts is a bind-mounted file naming every node and
mapping this machine's hostname to the node's own address; the jobs inherit
both, so ``MASTER_ADDR`` (the first node's name) resolves there.  slurmctld
stays in the root namespace, listening on the bridge address
(``SlurmctldHost=<real hostname>(<bridge address>)``: slurmctld insists on the
machine's hostname).  One slurm.conf serves every slurmd (``-N <node>``; ``%n``
keeps spool, pid and log files apart) and one munged serves them all (a Unix
socket crosses network namespaces).  Such a cluster does not claim
/run/slurm/conf (the Snakemake plugin is not used on it), so it can run next to
the one-node session cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# binary -> package that provides it
BINARIES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
    "sinfo": "slurm-client",
    "srun": "slurm-client",
    "munged": "munge",
}
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
PARTITION = "debug"
NODE = "localhost"
# job states after which SLURM runs the job no more (a requeued job passes through PENDING instead)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")
# several nodes: network namespaces on a private bridge (PrivateNetwork)
NETNS_PREFIX = "bddpm-node"
BRIDGE = "bddpm-br0"
IFACE = "bddpm0"            # the interface name inside every node's namespace
SUBNET = "10.213.77"        # /24; .1 is the bridge (slurmctld), .11, .12, ... the nodes
# Where SLURM 22.05 clients look for slurm.conf when SLURM_CONF is not set:
# /etc/slurm/slurm.conf, then /run/slurm/conf/slurm.conf (configless slurmd's cache).
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
RUN_CONF_LINK = Path("/run/slurm/conf/slurm.conf")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the message says why)."""


# --------------------------------------------------------------------------- install


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed(install: bool = True, timeout: float = 900) -> str | None:
    """Make sure the SLURM and munge binaries are there.

    Returns None when they are (installing the Debian packages with apt-get if
    they are missing, the machine is Debian-like and we are root), else a
    one-line reason why SLURM cannot be had here.  Service start-up during the
    install is blocked with a temporary /usr/sbin/policy-rc.d (only if there is
    none), so the packages' own munge/slurm services are not started.
    """
    if not sys.platform.startswith("linux"):
        return f"SLURM test cluster needs Linux (this is {sys.platform})"
    missing = missing_binaries()
    if not missing:
        return None
    if not install:
        return f"SLURM binaries missing: {', '.join(missing)} (install not allowed)"
    if os.geteuid() != 0:
        return f"SLURM binaries missing ({', '.join(missing)}) and not root, cannot apt-get install"
    apt = shutil.which("apt-get")
    if apt is None:
        return f"SLURM binaries missing ({', '.join(missing)}) and no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        try:
            policy.write_text("#!/bin/sh\n# written by tests/slurm/cluster.py during apt-get install\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
        except OSError:
            pass
    try:
        for cmd in (
            [apt, "-q", "update"],
            [apt, "-y", "-q", "install", "--no-install-recommends", *PACKAGES],
        ):
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"`{' '.join(cmd)}` failed: {e}"
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                return f"`{' '.join(cmd)}` failed (rc={r.returncode}): {' | '.join(tail)}"
    finally:
        if made_policy:
            with contextlib.suppress(OSError):
                policy.unlink()
    missing = missing_binaries()
    if missing:
        return f"apt-get install {' '.join(PACKAGES)} did not provide: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- config


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _mem_total_mb() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def slurm_conf(
    workdir: Path,
    *,
    cpus: int,
    real_memory_mb: int,
    ctld_port: int,
    slurmd_port: int,
    min_job_age: int = 3600,
    cluster_name: str = "brainddpm-ci",
    gres: str | None = None,
    extra_partitions: tuple[str, ...] = (),
    network: PrivateNetwork | None = None,
) -> str:
    w = workdir
    node_gres = f" Gres={gres}" if gres else ""
    gres_types = f"GresTypes={gres.split(':')[0]}\n" if gres else ""
    if network is None:
        ctld_host = f"{NODE}(127.0.0.1)"
        node_lines = (f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb}{node_gres} "
                      "State=UNKNOWN\n")
        node_list, what = NODE, "a one-node test cluster on localhost"
    else:
        ctld_host = f"{socket.gethostname()}({network.bridge_addr})"
        node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN\n"
                             for name, addr in network.nodes)
        node_list = ",".join(name for name, _ in network.nodes)
        what = f"a {len(network.nodes)}-node test cluster in network namespaces"
    per_node = "/%n" if network is not None else ""
    extra = "".join(f"PartitionName={p} Nodes={node_list} MaxTime=INFINITE State=UP\n" for p in extra_partitions)
    return f"""\
# Written by tests/slurm/cluster.py: {what}.
ClusterName={cluster_name}
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munge socket; cred_expire: how long a requeued job waits before it may start again
AuthInfo=socket={w}/munge/munge.socket,cred_expire=10
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool{per_node}
SlurmctldPidFile={w}/run/slurmctld.pid
SlurmdPidFile={w}/run/slurmd{per_node.replace("/", "-")}.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd{per_node.replace("/", "-")}.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={w}/plugstack.conf
# no cgroups (containers, gVisor)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SlurmdParameters=config_overrides
# scheduling
SchedulerType=sched/backfill
# the default 30/60 s would leave a requeued job pending for up to a minute after its begin time
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge={min_job_age}
KillWait=5
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
# no slurmdbd: job records in a text file (sacct --completion reads it)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={w}/jobcomp.txt
{gres_types}{node_lines}PartitionName={PARTITION} Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
{extra}"""



# --------------------------------------------------------------------------- network (several nodes)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class PrivateNetwork:
    """A bridge with a private /24 in the root namespace and one network namespace per node.

    nodes: (name, address) per node; node i lives in namespace f"{NETNS_PREFIX}{i}" on interface IFACE.
    Nothing is routed beyond the bridge: the namespaces have no default route.
    """

    nodes: list
    bridge_addr: str = f"{SUBNET}.1"
    up: bool = False

    @staticmethod
    def namespace(i: int) -> str:
        return f"{NETNS_PREFIX}{i + 1}"

    @classmethod
    def create(cls, n: int) -> PrivateNetwork:
        if shutil.which("ip") is None:
            raise SlurmUnavailable("several SLURM nodes need network namespaces: `ip` (iproute2) is missing")
        cleanup_stale_network()
        net = cls(nodes=[(f"node{i + 1}", f"{SUBNET}.{11 + i}") for i in range(n)])
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            net.up = True
            _ip("addr", "add", f"{net.bridge_addr}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for i, (_, addr) in enumerate(net.nodes):
                ns, veth = cls.namespace(i), f"bddpm-v{i + 1}"
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", ns)
                _ip("link", "set", veth, "master", BRIDGE, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
                _ip("-n", ns, "link", "set", IFACE, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            net.teardown()
            raise SlurmUnavailable(f"cannot build the private network: {' '.join(e.cmd)}: {e.stderr.strip()}") from None
        return net

    def hosts_file(self, i: int) -> str:
        """/etc/hosts as node i sees it: every node, and this machine's hostname as node i itself."""
        lines = ["127.0.0.1 localhost"]
        for j, (name, addr) in enumerate(self.nodes):
            lines.append(f"{addr} {name}" + (f" {socket.gethostname()}" if j == i else ""))
        return "\n".join(lines) + "\n"

    def teardown(self) -> None:
        """Delete the namespaces and the bridge (the veth pairs go with them). Idempotent."""
        for i in range(len(self.nodes)):
            _ip("netns", "del", self.namespace(i), check=False)
        if self.up:
            _ip("link", "del", BRIDGE, check=False)
            self.up = False


def cleanup_stale_network() -> None:
    """What a killed earlier run left behind: our namespaces (their processes first) and bridge."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for ns in [x for x in listed if x.startswith(NETNS_PREFIX)]:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "del", BRIDGE, check=False)


# --------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    workdir: Path
    conf: Path
    env: dict = field(default_factory=dict)
    """Environment for subprocesses that use the cluster: os.environ without SLURM_*/SBATCH_*/SRUN_*,
    plus SLURM_CONF, and PATH = <dir of sys.executable (the venv)>:$PATH:/usr/sbin..."""
    cpus: int = 2
    real_memory_mb: int = 0
    procs: dict = field(default_factory=dict)  # name -> Popen
    marker: str = ""
    partition: str = PARTITION
    nodes: tuple = (NODE,)
    network: PrivateNetwork | None = None
    run_conf_claimed: bool = False
    _logfiles: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ helpers
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (text output)."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    def sbatch(self, *args: str) -> str:
        """sbatch --parsable ARGS..., returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def node_state(self) -> str:
        """The nodes' states as sinfo prints them (idle, mix, alloc, drain, down*, ...; "idle" when all are)."""
        r = self.run("sinfo", "-h", "-N", "-n", ",".join(self.nodes), "-o", "%t", check=False, timeout=20)
        states = sorted(set(r.stdout.split())) if r.returncode == 0 else []  # one line per partition
        return ",".join(states)

    def job_state(self, job_id: str) -> str:
        rec = _scontrol_jobs(self).get(str(job_id))
        return rec.get("JobState", "") if rec else ""

    def wait_job(self, job_id: str, states=FINAL_STATES, timeout: float = 60, poll: float = 0.5) -> str:
        """Wait until the job reaches one of `states` (default: any final state); returns it."""
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f}s\n{self.logs_tail()}")

    def wait_results(self, job, timeout: float = 120, grace: float = 15, poll: float = 0.5) -> list:
        """A submitit job's `results()`, bounded.

        submitit learns that a job has ended from sacct, which this cluster lacks, so `job.results()` alone
        waits forever for a task that died without its result file. This fails instead, with the job's
        state, its tasks' logs and the daemons' logs, when the results are not all there within `timeout`
        s, or `grace` s after SLURM ended the job; the job is cancelled first.
        """
        deadline, ended, state = time.time() + timeout, None, ""
        while not job.done():
            state = self.job_state(job.job_id)
            now = time.time()
            if state in FINAL_STATES:
                ended = ended or now
            if now > deadline or (ended and now - ended > grace):
                self.run("scancel", str(job.job_id), check=False)
                why = f"ended {state}" if ended else f"still {state or 'unknown'} after {timeout:.0f} s"
                raise AssertionError(f"submitit job {job.job_id} {why} without every task's result\n"
                                     + self.job_diagnostics(job))
            time.sleep(poll)
        return job.results()

    def job_diagnostics(self, job) -> str:
        """What to read when a submitit job went wrong: scontrol's record, the nodes, each task's log tails
        and the daemons' log tails."""
        from submitit.core.utils import JobPaths

        record = self.run("scontrol", "-o", "show", "job", str(job.job_id), check=False, timeout=20)
        out = [f"--- scontrol show job ---\n{(record.stdout or record.stderr).strip()}"]
        for task in range(getattr(job, "num_tasks", 1) or 1):
            paths = JobPaths(job.paths.folder, job.job_id, task_id=task)
            for p in (paths.stdout, paths.stderr):
                text = p.read_text(errors="replace").splitlines()[-30:] if p.exists() else ["(missing)"]
                out.append(f"--- {p} ---\n" + "\n".join(text))
        out.append(self.state_dump())
        return "\n".join(out)

    def state_dump(self) -> str:
        """The queue (all states), the nodes with their reasons, and the daemons' log tails: what a failed
        test adds to its report (conftest.py), so that a stuck or down node shows why."""
        out = []
        for title, cmd in (("squeue --states=all", ["squeue", "--states=all", "-o", "%i %j %T %r %M %N"]),
                           ("sinfo -N", ["sinfo", "-N", "-o", "%N %P %t %E"])):
            try:
                r = self.run(*cmd, check=False, timeout=20)
                out.append(f"--- {title} ---\n{(r.stdout or r.stderr).rstrip()}")
            except (OSError, subprocess.SubprocessError) as exc:
                out.append(f"--- {title} --- failed: {exc}")
        dead = [f"{n} (rc={p.returncode})" for n, p in self.procs.items() if p.poll() is not None]
        out.append(f"--- daemons: {'exited: ' + ', '.join(dead) if dead else 'all running'} ---")
        out.append(self.logs_tail())
        return "\n".join(out)

    def logs_tail(self, n: int = 20) -> str:
        out = []
        for p in [self.workdir / "log" / n for n in ("munged.log", "slurmctld.log")] + sorted(
                (self.workdir / "log").glob("slurmd*.log")):
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {p} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def job_records(self) -> list[dict]:
        return job_records(self)

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, stop slurmd(s), slurmctld and munged, kill leftovers, remove the private
        network. Idempotent."""
        try:
            if self.procs:
                self._stop_daemons(timeout)
        finally:
            if self.run_conf_claimed:
                _release_run_conf(self.conf)
                self.run_conf_claimed = False
            if self.network is not None:
                self.network.teardown()

    def _stop_daemons(self, timeout: float) -> None:
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=15)
                    deadline = time.time() + 15
                    while time.time() < deadline:
                        r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15)
                        if r.returncode != 0 or not r.stdout.split():
                            break
                        time.sleep(0.5)
        slurmds = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        _kill_leftovers(self.marker, str(self.conf))
        for f in self._logfiles:
            with contextlib.suppress(Exception):
                f.close()
        self.procs = {}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def _kill_leftovers(marker: str, conf: str) -> list[int]:
    """Kill slurmstepd's (they inherit the daemons' marker variable) and job
    processes (SLURM_JOB_ID set and SLURM_CONF pointing at our slurm.conf)
    that outlived the daemons.  Never ourselves or our ancestors."""
    protect = set()
    pid = os.getpid()
    while pid > 1:
        protect.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    victims = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in protect:
            continue
        env = _proc_environ(int(d.name))
        if not env:
            continue
        if (marker and env.get("BRAINDDPM_SLURM_CLUSTER") == marker) or (
            env.get("SLURM_CONF") == conf and "SLURM_JOB_ID" in env
        ):
            victims.append(int(d.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for v in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(v, sig)
                alive.append(v)
        if not alive:
            break
        deadline = time.time() + 5
        while time.time() < deadline and any(Path(f"/proc/{v}").exists() for v in alive):
            time.sleep(0.2)
        victims = [v for v in alive if Path(f"/proc/{v}").exists()]
    return victims


def _conf_alive(conf: Path) -> bool:
    """Is the slurmctld of this slurm.conf running?"""
    with contextlib.suppress(OSError, ValueError):
        for line in conf.read_text().splitlines():
            if line.startswith("SlurmctldPidFile="):
                pid = int(Path(line.split("=", 1)[1].strip()).read_text().strip())
                os.kill(pid, 0)
                return True
    return False


def _claim_run_conf(conf: Path) -> None:
    """Point /run/slurm/conf/slurm.conf at our slurm.conf.

    Needed because the Snakemake SLURM plugin's job step
    (snakemake-executor-plugin-slurm-jobstep) removes every SLURM_* variable
    but a few job ids, SLURM_CONF included, before it runs `srun ... python -m
    snakemake` inside the job; that srun (and sbatch/srun run by the rule, e.g.
    submitit in `brainddpm train`) then finds the config only at a default
    location.  /run/slurm/conf is the runtime location configless slurmd
    uses; /etc is not touched.  Refuses when /etc/slurm/slurm.conf exists (a
    real cluster's config would win) or another live test cluster holds the link.
    """
    if SYSTEM_CONF.exists():
        raise SlurmUnavailable(
            f"{SYSTEM_CONF} exists: SLURM clients inside jobs (which lose SLURM_CONF) would use that "
            "cluster, not the test cluster"
        )
    link = RUN_CONF_LINK
    if link.is_symlink():
        target = Path(os.readlink(link))
        if target == conf:
            return
        if target.exists() and _conf_alive(target):
            raise SlurmUnavailable(f"{link} belongs to another running test cluster ({target})")
        link.unlink()
    elif link.exists():
        raise SlurmUnavailable(f"{link} exists and is not ours (a configless slurmd on this machine?)")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".slurm.conf.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(conf, tmp)
    os.replace(tmp, link)


def _release_run_conf(conf: Path) -> None:
    link = RUN_CONF_LINK
    with contextlib.suppress(OSError):
        if link.is_symlink() and Path(os.readlink(link)) == conf:
            link.unlink()
    for d in (link.parent, link.parent.parent):  # /run/slurm/conf, /run/slurm: only if empty
        with contextlib.suppress(OSError):
            d.rmdir()


def _write_munge_key(path: Path) -> None:
    path.write_bytes(os.urandom(1024))
    path.chmod(0o400)


def start(
    workdir: str | os.PathLike,
    *,
    cpus: int | None = None,
    real_memory_mb: int | None = None,
    min_job_age: int = 3600,
    timeout: float = 60,
    claim_run_conf: bool = True,
    gres: str | None = None,
    extra_partitions: tuple[str, ...] = (),
    nodes: int = 1,
) -> Cluster:
    """Start munged, slurmctld and slurmd with config and state under `workdir`.

    nodes: 1 (one node `localhost`, the default) or more: nodes node1..nodeN, each slurmd in its own
      network namespace (PrivateNetwork; module docstring).  Such a cluster never claims
      /run/slurm/conf (claim_run_conf is ignored).

    cpus: CPUs the node advertises (default: $BRAINDDPM_SLURM_CPUS, else 4).
      SLURM is told this number regardless of the real core count
      (config_overrides).  4 on a 2-core machine lets a waiting 1-CPU job
      (the Snakemake `train` rule, which only submits and watches) coexist
      with the 2-task training job it submitted; with 2 they would deadlock.
    real_memory_mb: node memory (default: half the machine's, at most 16 GB).
      Never enforced, only checked against --mem requests.
    gres: e.g. "gpu:4": fake GPUs (/dev/tty0..3 as device files), only for
      checking that --gres requests are accepted (profiles/leonardo was checked
      this way).  extra_partitions: more partitions on the same node.
    Raises SlurmUnavailable (with the daemons' log tails) if the node does not
    become idle within `timeout` seconds; nothing is left running then.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the SLURM test cluster runs its daemons as root; not root")
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"SLURM binaries missing: {', '.join(missing)}")
    w = Path(workdir).resolve()
    if len(str(w / "munge" / "munge.socket")) > 100:  # AF_UNIX path limit is 108
        raise SlurmUnavailable(f"workdir path too long for a unix socket: {w}")
    if cpus is None:
        cpus = int(os.environ.get("BRAINDDPM_SLURM_CPUS", "4" if nodes == 1 else "2"))
    if nodes > 1:
        claim_run_conf = False
    if real_memory_mb is None:
        real_memory_mb = max(1024, min(16384, _mem_total_mb() // 2))
    for sub in ("munge", "state", "spool", "run", "log"):
        (w / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(w / "munge", 0o755)
    key = w / "munge" / "munge.key"
    if not key.exists():
        _write_munge_key(key)
    (w / "plugstack.conf").write_text("")
    ctld_port, slurmd_port = _free_ports(2)
    network = PrivateNetwork.create(nodes) if nodes > 1 else None
    conf = w / "slurm.conf"
    conf.write_text(
        slurm_conf(w, cpus=cpus, real_memory_mb=real_memory_mb, ctld_port=ctld_port,
                   slurmd_port=slurmd_port, min_job_age=min_job_age, gres=gres,
                   extra_partitions=tuple(extra_partitions), network=network)
    )
    if gres:  # fake devices: any character device will do without cgroups
        name, _, count = gres.rpartition(":")
        (w / "gres.conf").write_text(f"NodeName={NODE} Name={name} File=/dev/tty[0-{int(count) - 1}]\n")
    marker = uuid.uuid4().hex
    sbin = os.pathsep.join(d for d in SBIN_DIRS if d not in os.environ.get("PATH", "").split(os.pathsep))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    # the running interpreter's bin (the venv) first: jobs inherit PATH (sbatch --export=ALL),
    # so rules find `python`, `brainddpm`, `snakemake` of this venv
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p]
    venv_bin = os.path.dirname(sys.executable)
    path = [venv_bin] + [p for p in path if p != venv_bin] + ([sbin] if sbin else [])
    env["PATH"] = os.pathsep.join(path)
    daemon_env = dict(env, BRAINDDPM_SLURM_CLUSTER=marker)

    c = Cluster(workdir=w, conf=conf, env=env, cpus=cpus, real_memory_mb=real_memory_mb, marker=marker,
                nodes=tuple(name for name, _ in network.nodes) if network else (NODE,), network=network)
    if claim_run_conf:
        _claim_run_conf(conf)
        c.run_conf_claimed = True

    def spawn(name: str, cmd: list[str]) -> None:
        out = open(w / "log" / f"{name}.stdout", "ab")
        c._logfiles.append(out)
        c.procs[name] = subprocess.Popen(
            cmd, env=daemon_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=w, start_new_session=True,
        )

    try:
        spawn("munged", [
            _which("munged"), "--foreground", "--force",
            f"--socket={w}/munge/munge.socket", f"--key-file={key}",
            f"--pid-file={w}/run/munged.pid", f"--log-file={w}/log/munged.log",
            f"--seed-file={w}/munge/munged.seed", "--num-threads=2",
        ])
        _wait_for(lambda: (w / "munge" / "munge.socket").exists(), 15, "munged socket", c)
        spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])
        _wait_for(lambda: c.run("scontrol", "ping", check=False, timeout=10).stdout.find("UP") >= 0,
                  timeout, "slurmctld to answer `scontrol ping`", c)
        if network is None:
            spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(conf)])
        for i, (name, _) in enumerate(network.nodes if network else []):
            (w / "spool" / name).mkdir(parents=True, exist_ok=True)
            hosts = w / "run" / f"hosts-{name}"
            hosts.write_text(network.hosts_file(i))
            # the node's network namespace, and a private mount namespace with its own /etc/hosts
            spawn(f"slurmd-{name}", [
                _which_any("nsenter"), f"--net=/run/netns/{network.namespace(i)}",
                _which_any("unshare"), "--mount", "--propagation", "private",
                "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                _which("slurmd"), "-D", "-N", name, "-f", str(conf)])
        _wait_for(lambda: c.node_state() in ("idle", "mix", "alloc"), timeout, "the nodes to be idle in sinfo", c)
    except BaseException:
        c.stop()
        raise
    atexit.register(c.stop)  # in case the caller never gets to stop() (stop is idempotent)
    return c


def _which_any(name: str) -> str:
    path = shutil.which(name) or _which(name)
    if not path:
        raise SlurmUnavailable(f"{name} (util-linux) is missing: needed for several SLURM nodes")
    return path


def _wait_for(pred, timeout: float, what: str, c: Cluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        dead = [n for n, p in c.procs.items() if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(f"{', '.join(dead)} exited (rc={c.procs[dead[0]].returncode}) while waiting for "
                                   f"{what}\n{_stdout_tail(c)}{c.logs_tail()}")
        try:
            if pred():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n{_stdout_tail(c)}{c.logs_tail()}")


def _stdout_tail(c: Cluster, n: int = 10) -> str:
    out = []
    for name in c.procs:
        p = c.workdir / "log" / f"{name}.stdout"
        if p.exists() and p.stat().st_size:
            out.append(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
    return "\n".join(out) + ("\n" if out else "")


# --------------------------------------------------------------------------- records

_KV = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:]*)=")


def _parse_kv_line(line: str) -> dict[str, str]:
    """Parse 'Key=value Key2=value with spaces Key3=...' (scontrol -o / jobcomp)."""
    matches = list(_KV.finditer(line))
    rec = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        rec[m.group(1)] = line[m.end():end].strip()
    return rec


def _scontrol_jobs(c: Cluster) -> dict[str, dict[str, str]]:
    r = c.run("scontrol", "-o", "show", "job", check=False, timeout=20)
    if r.returncode != 0:
        return {}
    jobs = {}
    for line in r.stdout.splitlines():
        if line.strip() and "JobId=" in line:
            rec = _parse_kv_line(line)
            jobs[rec["JobId"]] = rec
    return jobs


def _jobcomp_lines(c: Cluster) -> list[dict[str, str]]:
    p = c.workdir / "jobcomp.txt"
    if not p.exists():
        return []
    return [_parse_kv_line(line) for line in p.read_text(errors="replace").splitlines() if "JobId=" in line]


def _none_if_blank(v):
    return None if v in (None, "", "(null)") else v


def job_records(cluster: Cluster) -> list[dict]:
    """All jobs this cluster has seen, oldest first, one dict per job id:

    job_id, name, state (current/final), exit_code ("0:0"), partition,
    requeues (how often it was requeued), comment (the Snakemake plugin's
    "rule_<name>[_wildcards_...]"; None when the job is no longer in
    slurmctld), work_dir, node_list, submit_time, start_time, end_time,
    array_job_id/array_task_id (None unless an array task; job_id is the raw id),
    runs (the jobcomp.txt entries: one per end of a run, requeues included,
    each with state/exit_code/start_time/end_time), source ("scontrol",
    "jobcomp" or both).
    """
    by_id: dict[str, dict] = {}
    for e in _jobcomp_lines(cluster):
        jid = e.get("JobId")
        if not jid:
            continue
        rec = by_id.setdefault(jid, {"job_id": jid, "runs": [], "source": "jobcomp"})
        rec["runs"].append({
            "state": e.get("JobState"), "exit_code": e.get("ExitCode"),
            "start_time": e.get("StartTime"), "end_time": e.get("EndTime"),
        })
        rec.update(
            name=e.get("Name"), state=e.get("JobState"), exit_code=e.get("ExitCode"),
            partition=e.get("Partition"), work_dir=e.get("WorkDir"), node_list=e.get("NodeList"),
            submit_time=e.get("SubmitTime"), start_time=e.get("StartTime"), end_time=e.get("EndTime"),
            array_job_id=e.get("ArrayJobId"), array_task_id=e.get("ArrayTaskId"),
        )
    for jid, s in _scontrol_jobs(cluster).items():
        rec = by_id.setdefault(jid, {"job_id": jid, "runs": [], "source": "scontrol"})
        if rec["source"] == "jobcomp":
            rec["source"] = "jobcomp+scontrol"
        rec.update(
            name=s.get("JobName"), state=s.get("JobState"), exit_code=s.get("ExitCode"),
            partition=s.get("Partition"), work_dir=s.get("WorkDir"), node_list=_none_if_blank(s.get("NodeList")),
            submit_time=s.get("SubmitTime"), start_time=s.get("StartTime"), end_time=s.get("EndTime"),
            comment=_none_if_blank(s.get("Comment")),
            requeues=int(s.get("Restarts", "0") or 0),
            reason=s.get("Reason"),
            array_job_id=_none_if_blank(s.get("ArrayJobId")), array_task_id=_none_if_blank(s.get("ArrayTaskId")),
        )
    for rec in by_id.values():
        rec.setdefault("comment", None)
        rec.setdefault("reason", None)
        # jobcomp.txt gets a line each time a run ends, requeues included
        # (that line says JobState=PENDING); scontrol's Restarts counts them too
        rec["requeues"] = max(rec.get("requeues", 0), len(rec["runs"]) - 1)
    return sorted(by_id.values(), key=lambda r: int(re.match(r"\d+", r["job_id"]).group()))
