"""The one install path: the Makefile's venv, the LEONARDO setup script, the conda env that follows
the same recipe, and the profiles that assume it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

BIN = Path(sys.executable).parent


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)


def _conda_pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "brainddpm.yaml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1, env
    return pip[0]["pip"]


def test_every_rule_uses_the_one_conda_env():
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    envs = re.findall(r"conda:\n\s+(\S+)", rules)
    assert envs and set(envs) == {'"../envs/brainddpm.yaml"'}
    assert sorted(p.name for p in (ROOT / "workflow" / "envs").iterdir()) == ["brainddpm.yaml"]


def test_conda_env_follows_the_makefile_recipe():
    lines = _conda_pip_lines()
    # torch pinned like the Makefile; the CUDA index only as an EXTRA index (--index-url hides PyPI)
    assert f"torch=={_makefile_var('TORCH_VERSION')}" in lines
    assert not any(line.startswith("--index-url") for line in lines)
    assert any(line.startswith("--extra-index-url https://download.pytorch.org/whl/") for line in lines)
    assert "-e ../.." in lines  # this checkout, with pyproject.toml's pins


def test_conda_env_resolves_to_the_tested_venv(tmp_path):
    """conda runs pip on a requirements file written next to the env file, from that folder: do the
    same offline, against this (tested) venv.  Only brain-ddpm itself would be (re)installed: every
    pinned dependency is satisfied by exactly what the test suite runs with."""
    import json

    envs = ROOT / "workflow" / "envs"
    req = envs / f"condaenv.{os.getpid()}.requirements.txt"
    req.write_text("\n".join(_conda_pip_lines()) + "\n")
    report = tmp_path / "report.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                               "--no-build-isolation", "--report", str(report), "-r", req.name],
                              cwd=envs, capture_output=True, text=True, timeout=300)
    finally:
        req.unlink()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    install = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert install == ["brainddpm"], install


def test_leonardo_setup_refuses_a_cpu_torch(tmp_path):
    """envs/leonardo.sh on a machine without `module`: it installs through the Makefile (here a `make`
    that records its arguments and points the venv's python at this interpreter) and then refuses the install,
    because this torch is a CPU build; run elsewhere than the repository root it says where to run."""
    import torch

    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build: the refusal cannot be shown here")
    repo = tmp_path / "repo"
    (repo / "envs").mkdir(parents=True)
    shutil.copy(ROOT / "envs" / "leonardo.sh", repo / "envs")
    shutil.copy(ROOT / "Snakefile", repo)
    shutil.copy(ROOT / "pyproject.toml", repo)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "make").write_text(f"""#!/bin/sh
echo "$@" > make-args.txt
mkdir -p .venv/bin && printf '#!/bin/sh\nexec {sys.executable} "$@"\n' > .venv/bin/python
chmod +x .venv/bin/python
""")
    (fake / "make").chmod(0o755)
    env = {"PATH": f"{fake}:{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "envs/leonardo.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "is a CPU build: the GPU jobs need the CUDA one" in proc.stderr, proc.stderr
    args = (repo / "make-args.txt").read_text().split()
    assert args[0] == "install" and "TORCH_INDEX=https://download.pytorch.org/whl/cu126" in args, args
    wrong = subprocess.run(["bash", str(repo / "envs" / "leonardo.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "run me from the brain-ddpm repository root" in wrong.stderr


@pytest.mark.parametrize("profile", ["leonardo", "slurm"])
def test_cluster_profile_dry_run(profile, tmp_path):
    """What a new user types first (README), in this checkout with its venv: the profile's dry-run with
    a fake account plans the whole DAG; nothing in the profile needs conda, a `directory:` or a shell."""
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"results": str(tmp_path / "results")}))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BRAINDDPM_SLURM_ACCOUNT": "fake_account"}
    env.pop("SLURM_CONF", None)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", f"profiles/{profile}",
                           "--configfile", "config/config.yaml", "config/demo.yaml", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "This was a dry-run" in out and "demo_cohort" in out
    assert not (ROOT / "$WORK").exists()
    text = (ROOT / "profiles" / profile / "config.v8+.yaml").read_text()
    assert not re.search(r"^(software-deployment-method|sdm|directory|conda-prefix):", text, flags=re.M)
