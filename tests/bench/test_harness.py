"""bench/harness.py: sections in child processes under deadlines. The children here are real processes that
only report (the standard library, milliseconds to start): one that overruns, one that raises an
out-of-memory, one that dies, one that measures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainddpm.bench.harness import run_sections

SRC = Path(__file__).resolve().parents[2] / "src"
CHILD = """
import argparse, os, subprocess, sys, time
from pathlib import Path
from brainddpm.bench.harness import run_child

p = argparse.ArgumentParser()
p.add_argument("pids", type=Path)
p.add_argument("--progress", type=Path)
p.add_argument("--budget-end", type=float)
p.add_argument("--sections", nargs="+")
args = p.parse_args()

def slow():  # a compile that never ends, with a worker process of its own
    worker = subprocess.Popen(["sleep", "120"])
    args.pids.write_text(str(worker.pid))
    time.sleep(120)

def fails():
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

def dies():
    os._exit(3)

sections = {"slow": (slow, 0), "fails": (fails, 0), "dies": (dies, 0), "fast": (lambda: {"value": 1}, 0),
            "big": (lambda: {"value": 2}, 100)}
run_child(args.sections, sections, args.progress, args.budget_end)
"""


@pytest.fixture(autouse=True)
def _child_imports_this_checkout(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))


def _run(tmp_path: Path, names: list[str], section_s: float = 30.0, budget_end: float | None = None) -> dict:
    rows: dict = {}
    run_sections([sys.executable, "-c", CHILD, str(tmp_path / "pids")], names, tmp_path / "progress",
                 budget_end, section_s, lambda name, row: rows.__setitem__(name, row))
    return rows


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return True
    return "State:\tZ" in status.read_text()  # a zombie whose parent was killed: no longer runs


def test_an_overrunning_section_is_recorded_timed_out_with_its_workers_killed_and_the_next_runs(tmp_path):
    t = time.monotonic()
    rows = _run(tmp_path, ["slow", "fast"], section_s=2.0)
    assert time.monotonic() - t < 60  # not the 120 s the section would take
    assert rows["slow"]["timed_out"] is True and "deadline" in rows["slow"]["error"]
    assert rows["fast"] == {"value": 1}  # measured by a fresh child
    worker = int((tmp_path / "pids").read_text())
    deadline = time.monotonic() + 5
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(worker), "the section's own worker process outlived the kill"
    assert list(rows) == ["slow", "fast"]


def test_errors_out_of_memory_and_a_dead_child_each_get_a_row_and_the_rest_still_runs(tmp_path):
    rows = _run(tmp_path, ["fails", "dies", "fast"])
    assert rows["fails"]["oom"] is True and "out of memory" in rows["fails"]["error"]
    assert rows["dies"]["crashed"] is True and "exit code 3" in rows["dies"]["error"]
    assert rows["fast"] == {"value": 1}


def test_a_section_that_no_longer_fits_the_budget_is_skipped_and_says_so(tmp_path):
    rows = _run(tmp_path, ["fast", "big"], budget_end=time.time() + 30)
    assert rows["fast"] == {"value": 1}
    assert "budget" in rows["big"]["skipped"] and "100 s" in rows["big"]["skipped"]  # by the child


def test_the_parent_skips_what_the_budget_no_longer_fits_before_starting_a_child(tmp_path):
    rows = {}
    run_sections([sys.executable, "-c", CHILD, str(tmp_path / "pids")], ["big", "fast"], tmp_path / "progress",
                 time.time() + 30, 30.0, rows.__setitem__, needs={"big": 100})
    assert "100 s" in rows["big"]["skipped"] and rows["fast"] == {"value": 1}
    assert "big" not in (tmp_path / "progress").read_text()  # the child was never asked to run it


def test_the_budget_end_stops_the_running_section(tmp_path):
    rows = _run(tmp_path, ["slow", "fast"], section_s=600.0, budget_end=time.time() + 3)
    assert rows["slow"]["timed_out"] is True and "budget" in rows["slow"]["error"]
    assert "budget" in rows["fast"]["skipped"]  # the budget is spent: nothing starts after it
    assert "fast" not in (tmp_path / "progress").read_text()  # skipped without starting a child for it


def test_the_child_reports_json_lines_and_the_harness_imports_no_torch(tmp_path):
    _run(tmp_path, ["fast"])
    lines = [json.loads(line) for line in (tmp_path / "progress").read_text().splitlines()]
    assert lines == [{"begin": "fast"}, {"end": "fast", "row": {"value": 1}}]
    assert subprocess.run([sys.executable, "-c", "import brainddpm.bench.harness, sys; "
                           "sys.exit('torch' in sys.modules)"]).returncode == 0
