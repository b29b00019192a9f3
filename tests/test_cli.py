"""The command line: help texts, and one clear line (no traceback) for bad inputs."""

import argparse
import subprocess
import sys

import pytest

from brainddpm.cli import build_parser, main


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo-cohort", "manifest", "split", "shard", "index", "train", "sample", "features", "bootstrap",
            "gather", "memorization", "fetch-fid-weights", "report", "bench", "condition-plan",
            "condition-check"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.format_help(), name


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["index", "--split", "train", "--out", "x.json", "--shardz", "a.h5"])
    assert "unrecognized arguments: --shardz" in capsys.readouterr().err


def test_unreadable_input_gives_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "shard-0000.h5"
    bad.write_bytes(b"not hdf5")
    proc = subprocess.run([sys.executable, "-m", "brainddpm.cli", "index", "--split", "train", "--shards", str(bad),
                           "--out", str(tmp_path / "index.json")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "brainddpm index: error:" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "index.json").exists()


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: {lr: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "brainddpm.cli", "split", "--config", "config/config.yaml", str(cfg),
                           "--manifest", "m.tsv", "--out", str(tmp_path / "s.tsv")], capture_output=True, text=True)
    assert proc.returncode == 2 and "config key 'train.lr'" in proc.stderr


def test_every_option_has_help():
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, p in action.choices.items():
                    walk(p, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "brainddpm")
    assert not missing, f"options without a help text: {missing}"


def test_help_imports_no_library_code():
    # the subcommands import what they call only when they run: `brainddpm --help` stays fast
    code = ("import sys; from brainddpm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'monai', 'h5py', 'yaml', 'jsonschema') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_performance_comes_from_the_option_or_the_workflow_variable(monkeypatch):
    from types import SimpleNamespace

    from brainddpm.commandline import PERFORMANCE_VARIABLE, with_performance
    from brainddpm.errors import ConfigError

    monkeypatch.delenv(PERFORMANCE_VARIABLE, raising=False)
    assert with_performance({"seed": 1}, SimpleNamespace(performance_json=None)) == {"seed": 1}
    monkeypatch.setenv(PERFORMANCE_VARIABLE, '{"compile": false}')
    assert with_performance({"seed": 1}, SimpleNamespace(performance_json=None))["performance"] == {"compile": False}
    got = with_performance({}, SimpleNamespace(performance_json='{"channels_last": true}'))
    assert got["performance"] == {"channels_last": True}  # the option wins over the variable
    with pytest.raises(ConfigError, match="'performance'"):
        with_performance({}, SimpleNamespace(performance_json="{compile"))
    with pytest.raises(ConfigError, match="performance.compile"):
        with_performance({}, SimpleNamespace(performance_json='{"compile": "sometimes"}'))


def test_use_checkpoint_reaches_the_autoencoder_from_either_config_source():
    """train-autoencoder's --use-checkpoint (the workflow keeps it out of the params) wins over --config files and
    completes a --config-json that lacks it, as the workflow's does."""
    import json

    from brainddpm.config import load_config
    from brainddpm.errors import ConfigError
    from brainddpm.training.commands import autoencoder_job_config

    files = ["config/config.yaml", "config/demo.yaml", "config/latent.yaml"]
    common = ["--shards", "s", "--out", "o"]
    parse = build_parser().parse_args
    assert load_config(files)["autoencoder"]["use_checkpoint"] is True
    cfg = autoencoder_job_config(parse(["train-autoencoder", "--config", *files, "--use-checkpoint", "false", *common]))
    assert cfg["autoencoder"]["use_checkpoint"] is False
    full = load_config(files)
    section = {k: v for k, v in full["autoencoder"].items() if k != "use_checkpoint"}
    job = json.dumps({"run": "r", "seed": 1, "autoencoder": section, "train": full["train"]})
    cfg = autoencoder_job_config(parse(["train-autoencoder", "--config-json", job, "--use-checkpoint", "true", *common]))
    assert cfg["autoencoder"]["use_checkpoint"] is True
    with pytest.raises(ConfigError, match="autoencoder.use_checkpoint"):
        autoencoder_job_config(parse(["train-autoencoder", "--config-json", job, *common]))
