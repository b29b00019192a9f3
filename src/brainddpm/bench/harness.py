"""Run benchmark sections in a child process, each under its own deadline: a section that overruns is
recorded as such, never hung.

The parent (`run_sections`) starts a child process with the sections to run; the child (`run_child`) runs
them in order and appends one JSON line to a progress file when a section begins and one, with its row,
when it ends. The parent reads the lines as they come. A section still running `section_s` seconds after
it began, or when the budget ends, is recorded as timed out: the child's whole process group is killed
(compile workers included) and a new child runs the sections left. A section that raises records the error
as its row (an out-of-memory says so); a child that dies records its section as crashed. A section whose
estimated need no longer fits the budget is skipped, and says so (by the parent before a child starts, whose
imports take seconds, and by the child before each section). Standard library only: a child that only
reports (the tests') starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.2


def _append(progress: Path, line: dict) -> None:
    with open(progress, "a") as handle:
        handle.write(json.dumps(line, default=str) + "\n")
        handle.flush()


def error_row(exc: BaseException) -> dict:
    """The row of a section that raised: the error in one line; an out-of-memory is flagged."""
    return {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "oom": "out of memory" in str(exc).lower()}


def _skip_note(left: float, need_s: float) -> dict:
    return {"skipped": f"budget: {max(left, 0):.0f} s left, the section needs about {need_s:.0f} s"}


def run_child(names: list[str], sections: dict[str, tuple[Callable[[], dict], float]], progress: Path,
              budget_end: float | None) -> None:
    """Run `sections[name] = (function, estimated seconds)` for each of `names` in order, reporting each to
    `progress`; a section whose estimate exceeds what is left of the budget (a Unix time) is skipped."""
    for name in names:
        function, need_s = sections[name]
        left = None if budget_end is None else budget_end - time.time()
        if left is not None and (left < need_s or left <= 0):
            _append(progress, {"end": name, "row": _skip_note(left, need_s)})
            continue
        _append(progress, {"begin": name})
        try:
            row = function()
        except Exception as exc:  # the row's figure: the next section still measures
            traceback.print_exc()
            row = error_row(exc)
        _append(progress, {"end": name, "row": row})


class _Watch:
    """The progress file of one child, read line by line as it grows."""

    def __init__(self, progress: Path) -> None:
        self.progress, self.offset = progress, 0
        self.current: str | None = None
        self.began = 0.0

    def lines(self) -> list[dict]:
        if not self.progress.exists():
            return []
        with open(self.progress) as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[:text.rfind("\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the child and every process it started
    except ProcessLookupError:
        pass
    child.wait()


def _watch_child(child: subprocess.Popen, watch: _Watch, left: list[str], budget_end: float | None,
                 section_s: float, on_row: Callable[[str, dict], None]) -> bool:
    """Follow one child until it ends or overruns; rows go to `on_row` and leave `left`. True when the child
    ended on its own."""
    while True:
        exited = child.poll() is not None
        for line in watch.lines():
            if "begin" in line:
                watch.current, watch.began = line["begin"], time.time()
            else:
                watch.current = None
                left.remove(line["end"])
                on_row(line["end"], line["row"])
        if exited:
            return True
        if watch.current is not None:
            ran = time.time() - watch.began
            budget_over = budget_end is not None and time.time() >= budget_end
            if ran >= section_s or budget_over:
                _kill(child)
                why = "the budget (--budget-s) ended" if budget_over and ran < section_s else \
                    f"the section's deadline (--section-timeout-s {section_s:.0f})"
                left.remove(watch.current)
                on_row(watch.current, {"timed_out": True, "error": f"stopped after {ran:.0f} s: {why}"})
                return False
        time.sleep(POLL_S)


def _skip_what_no_longer_fits(left: list[str], needs: dict[str, float], budget_end: float | None,
                              on_row: Callable[[str, dict], None]) -> None:
    """Before a child starts (its imports take seconds): the sections that the budget no longer fits are
    skipped here, so no child starts only to skip them after the budget has ended."""
    if budget_end is None:
        return
    seconds = budget_end - time.time()
    for name in list(left):
        need_s = needs.get(name, 0.0)
        if seconds < need_s or seconds <= 0:
            left.remove(name)
            on_row(name, _skip_note(seconds, need_s))


def run_sections(command: list[str], names: list[str], progress: Path, budget_end: float | None,
                 section_s: float, on_row: Callable[[str, dict], None], needs: dict[str, float] | None = None) -> None:
    """Run sections `names` in child processes `command --progress P --budget-end T --sections NAME...` (the
    child calls `run_child`), one after another, until each has a row: measured, failed, skipped, timed out
    or crashed. `budget_end`: a Unix time (None: no budget); `section_s`: the most one section may run;
    `needs`: each section's estimated seconds, as the child has them (absent: 0)."""
    left = list(names)
    while True:
        _skip_what_no_longer_fits(left, needs or {}, budget_end, on_row)
        if not left:
            return
        progress.unlink(missing_ok=True)
        argv = [*command, "--progress", str(progress), "--sections", *left]
        argv += ["--budget-end", str(budget_end)] if budget_end is not None else []
        child = subprocess.Popen(argv, start_new_session=True)
        watch = _Watch(progress)
        try:
            ended = _watch_child(child, watch, left, budget_end, section_s, on_row)
        except BaseException:  # Ctrl-C or an error here: no child outlives the command
            _kill(child)
            raise
        if ended and left:
            rc = child.returncode
            if watch.current is not None:  # died inside a section: that one crashed, the rest get a new child
                left.remove(watch.current)
                on_row(watch.current, {"crashed": True, "error": f"the measuring process died (exit code {rc}) "
                                                                 "during this section"})
            else:  # died before beginning one: a new child would die the same way
                for name in list(left):
                    left.remove(name)
                    on_row(name, {"error": f"the measuring process exited (code {rc}) before this section began"})
