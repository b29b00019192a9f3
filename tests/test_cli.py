"""The command line: help texts, and one clear line (no traceback) for bad inputs."""

import argparse
import subprocess
import sys

import pytest

from brainddpm.cli import build_parser, main


def _subcommands(parser, path=()):
    """(path, parser) of every subcommand, nested ones (bench data, ...) too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield (*path, name), p
                yield from _subcommands(p, (*path, name))


def test_every_subcommand_has_a_help_line_and_a_description(capsys):
    """`brainddpm COMMAND --help`, as a user types it, for every subcommand: a description under the usage line
    (not only the one-line help of the list), and no argparse escape left in it (a literal "95%%")."""
    found = dict(_subcommands(build_parser()))
    assert {("demo-cohort",), ("manifest",), ("split",), ("shard",), ("index",), ("train",), ("sample",),
            ("features",), ("bootstrap",), ("gather",), ("memorization",), ("fetch-fid-weights",), ("report",),
            ("bench",), ("condition-plan",), ("condition-check",), ("reconstruction",), ("to-mni",),
            ("bench", "data")} <= set(found)
    bare, escaped = [], []
    for path, parser in found.items():
        with pytest.raises(SystemExit) as stop:
            main([*path, "--help"])
        assert stop.value.code == 0, path
        text = capsys.readouterr().out
        if not (parser.description or "").strip():
            bare.append(" ".join(path))
        assert parser.description is None or parser.description.split()[0] in text, path
        if "%%" in text:
            escaped.append(" ".join(path))
    assert not bare, f"subcommands whose --help has no description: {bare}"
    assert not escaped, f"--help shows a literal '%%': {escaped}"


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

    from brainddpm.arguments import PERFORMANCE_VARIABLE, with_performance
    from brainddpm.errors import ConfigError

    monkeypatch.delenv(PERFORMANCE_VARIABLE, raising=False)
    assert with_performance({"seed": 1}, SimpleNamespace(performance_json=None)) == {"seed": 1}
    monkeypatch.setenv(PERFORMANCE_VARIABLE, '{"compile": false}')
    got = with_performance({"seed": 1}, SimpleNamespace(performance_json=None))["performance"]
    assert got["compile"] is False and got["channels_last"] == "auto"  # the schema's defaults fill the rest
    got = with_performance({}, SimpleNamespace(performance_json='{"channels_last": true}'))["performance"]
    assert got["channels_last"] is True and got["compile"] == "auto"  # the option wins over the variable
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
    args = parse(["train-autoencoder", "--config-json", job, "--use-checkpoint", "true", *common])
    cfg = autoencoder_job_config(args)
    assert cfg["autoencoder"]["use_checkpoint"] is True
    with pytest.raises(ConfigError, match="autoencoder.use_checkpoint"):
        autoencoder_job_config(parse(["train-autoencoder", "--config-json", job, *common]))


def test_a_missing_key_says_the_defaults_file_comes_first(tmp_path):
    """`brainddpm manifest --config my.yaml`, without config/config.yaml before it: the missing key, and the command
    that works; with the defaults first, no such hint."""
    mine = tmp_path / "my.yaml"
    mine.write_text(f"datasets: [{{name: a, root: {tmp_path}}}]\n")
    common = ["manifest", "--manifest", str(tmp_path / "m.tsv"), "--excluded", str(tmp_path / "e.tsv")]
    proc = subprocess.run([sys.executable, "-m", "brainddpm.cli", *common, "--config", str(mine)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config key 'results': missing; config/config.yaml (every default) comes first" in proc.stderr
    assert f"--config config/config.yaml {mine}" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "brainddpm.cli", *common, "--config", "config/config.yaml",
                           str(tmp_path / "typo.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "typo.yaml does not exist" in proc.stderr and "comes first" not in proc.stderr
