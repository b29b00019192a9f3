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


def _profile_dry_run(profile: str, *configs, account: str | None = "fake_account"):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("SLURM_CONF", None)
    env.pop("BRAINDDPM_SLURM_ACCOUNT", None)
    if account is not None:
        env["BRAINDDPM_SLURM_ACCOUNT"] = account
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", f"profiles/{profile}",
                           "--configfile", "config/config.yaml", *map(str, configs)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _site_config(tmp_path) -> Path:
    """The README's LEONARDO site config: one's own BIDS data, training submitted to the Booster."""
    from helpers import bids_dataset

    bids_dataset(tmp_path / "bids", 2)
    site = tmp_path / "leonardo.yaml"
    site.write_text(yaml.safe_dump({"results": str(tmp_path / "results"),
                                    "datasets": [{"name": "adni", "root": str(tmp_path / "bids")}],
                                    "launch": {"executor": "slurm", "partition": "boost_usr_prod", "qos": "normal",
                                               "nodes": 2, "gpus_per_node": 4, "time_min": 1440}}))
    return site


@pytest.mark.parametrize("profile", ["leonardo", "slurm"])
def test_cluster_profile_dry_run(profile, tmp_path):
    """What a new user types first (README), in this checkout with its venv: the profile's dry-run with
    a fake account plans the whole DAG; nothing in the profile needs conda, a `directory:` or a shell.
    LEONARDO with the README's site config; the template with the demo (its partitions are placeholders)."""
    if profile == "leonardo":
        proc = _profile_dry_run(profile, _site_config(tmp_path))
    else:
        cfg = tmp_path / "site.yaml"
        cfg.write_text(yaml.safe_dump({"results": str(tmp_path / "results")}))
        proc = _profile_dry_run(profile, "config/demo.yaml", cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "This was a dry-run" in out and ("manifest" if profile == "leonardo" else "demo_cohort") in out
    if profile == "leonardo":  # what `train` submits, in one line
        assert "rule train submits one SLURM job: 2 node(s) x 4 GPU(s); partition boost_usr_prod" in out
        assert "account fake_account" in out
    assert not (ROOT / "$WORK").exists()
    text = (ROOT / "profiles" / profile / "config.v8+.yaml").read_text()
    assert not re.search(r"^(software-deployment-method|sdm|directory|conda-prefix):", text, flags=re.M)


def test_cluster_profiles_refuse_what_they_cannot_run(tmp_path):
    """Three mistakes a dry run used to pass: the demo preset under the LEONARDO profile (a CPU-only 24 h `train`
    job, an A100 per sampling part); a profile whose jobs would carry the literal $BRAINDDPM_SLURM_ACCOUNT, with the
    demo's in-process training (no `launch.executor: slurm`, which the account check once waited for) and with a
    site config whose own launch.account is set. Each stops in one line."""
    results = tmp_path / "results.yaml"
    results.write_text(yaml.safe_dump({"results": str(tmp_path / "results")}))
    proc = _profile_dry_run("leonardo", "config/demo.yaml", results)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert ("invalid configuration: config key 'launch.executor': inprocess under a profile for LEONARDO's Booster "
            "(boost_usr_prod)") in out and "run this config with --profile profiles/local" in out, out[-3000:]
    unset = "profile key 'default-resources: slurm_account': $BRAINDDPM_SLURM_ACCOUNT is not set"
    proc = _profile_dry_run("slurm", "config/demo.yaml", results, account=None)
    assert proc.returncode != 0 and unset in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    site = _site_config(tmp_path)
    doc = yaml.safe_load(site.read_text())
    site.write_text(yaml.safe_dump({**doc, "launch": {**doc["launch"], "account": "mine"}}))
    proc = _profile_dry_run("leonardo", site, account=None)
    assert proc.returncode != 0 and unset in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def _fake_venv_repo(tmp_path) -> Path:
    """A copy of the Makefile's world whose .venv/bin/python runs this interpreter but only records pip commands
    (nothing is installed, this venv is never touched), with an install stamp newer than pyproject.toml."""
    repo = tmp_path / "repo"
    (repo / "envs").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "envs/torch_build.py"):
        shutil.copy(ROOT / name, repo / name)
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "{repo}/pip-calls.txt"; exit 0; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    (repo / ".venv" / ".installed").touch()
    return repo


def _make(repo, *args):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(repo)})


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_install_replaces_a_torch_that_is_not_the_one_asked_for(tmp_path):
    """`make install TORCH_INDEX=...cu126` after a CPU install (or TORCH_VERSION changed) reinstalls torch instead
    of "Nothing to be done"; the same request as the installed one does nothing; `make -n` runs no pip."""
    import torch

    repo = _fake_venv_repo(tmp_path)
    calls = repo / "pip-calls.txt"
    index = "https://download.pytorch.org/whl/cu126"
    proc = _make(repo, "install")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout and not calls.exists(), proc.stdout
    requests = [["TORCH_VERSION=2.12.0"]] + ([] if torch.version.cuda else [[f"TORCH_INDEX={index}"]])
    for request in requests:
        assert _make(repo, "-n", "install", *request).returncode == 0 and not calls.exists()  # dry: nothing ran
        proc = _make(repo, "install", *request)
        out = proc.stdout + proc.stderr
        assert f"make install: the installed torch {torch.__version__}" in out and "reinstalling it" in out, out
        pip = calls.read_text().splitlines()
        version = request[0].split("=")[1] if request[0].startswith("TORCH_VERSION") else "2.13.0"
        assert pip[0] == "-m pip uninstall -q -y torch", pip
        assert any(line.startswith(f"-m pip install -q torch=={version}") for line in pip), pip
        if "TORCH_INDEX" in request[0]:
            assert "with CUDA 12.6 from " + index in out and f"--extra-index-url {index}" in "\n".join(pip)
        # this fake pip installed nothing: the check after the recipe says so, and the stamp is not renewed
        assert proc.returncode != 0 and "is not the one asked for" in proc.stderr, out
        calls.unlink()


def test_no_hint_writes_a_second_report_html():
    """The report rule writes report/report.html; Snakemake's own `--report FILE`, wherever the Makefile or the
    README suggests it, names another file (it would replace the rule's page, or sit beside it under its name)."""
    rule = (ROOT / "workflow" / "rules" / "report.smk").read_text()
    assert 'f"{R}/report/report.html"' in rule
    hints = re.findall(r"--report[ =](\S+?)['`\s]", (ROOT / "Makefile").read_text() + (ROOT / "README.md").read_text())
    assert hints, "no --report hint found"
    assert all(Path(h).name != "report.html" for h in hints), hints


def test_the_readme_cites_the_reference_study_of_citation_cff():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    study = cff["references"][0]
    assert study["doi"] in (ROOT / "README.md").read_text() and study["title"] in (ROOT / "README.md").read_text()


def test_readme_commands_put_targets_before_the_config_files():
    """Every snakemake command of the README and the profiles' README: after --configfile come config files only
    (a target there is read as a config file, friction 2 of issue 26); targets go before it."""
    wrong = []
    for doc in ("README.md", "profiles/README.md"):
        for line in (ROOT / doc).read_text().splitlines():
            for command in re.findall(r"snakemake [^`#\n]*--configfile [^`#\n]*", line):
                words = command.split("--configfile", 1)[1].split()
                files = words[:next((i for i, w in enumerate(words) if w.startswith("-")), len(words))]
                if not files or not all(re.search(r"\.ya?ml$|^<|\.\.\.$", w) for w in files):
                    wrong.append(f"{doc}: {command.strip()}")
    assert not wrong, "\n".join(wrong)
