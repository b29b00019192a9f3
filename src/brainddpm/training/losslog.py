"""The loss log: `StepLog` writes a row of loss.csv per step (and the live status file beside it), `plot_loss`
draws loss.png from it, `prepare_loss_csv` trims it to a resumed step."""

from __future__ import annotations

import collections
import csv
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from brainddpm.fileio import atomic_path

log = logging.getLogger(__name__)

# the live status file, next to checkpoints/loss.csv: the run's last step, loss, speed and ETA, rewritten every few
# seconds for whoever waits on the run (launch.LiveStatusWatcher)
LIVE_STATUS = "progress.json"


def plot_loss(csv_path: Path, png_path: Path) -> None:
    """Training MSE against epoch on a log scale, like the reference study's loss figure.

    Reads loss.csv (step, epoch, loss, lr, samples_per_s): every step as a faint line, the mean of
    each epoch as points joined by a line.
    """
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if rows:
        steps_per_epoch: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            steps_per_epoch[int(r["epoch"])].append(float(r["loss"]))
        # x position of step i inside epoch e: e + i / n, so the per-step curve lines up with epochs
        x, y = [], []
        for epoch, losses in sorted(steps_per_epoch.items()):
            x += [epoch + i / len(losses) for i in range(len(losses))]
            y += losses
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="step")
        epochs = sorted(steps_per_epoch)
        means = [sum(steps_per_epoch[e]) / len(steps_per_epoch[e]) for e in epochs]
        ax.plot([e + 1 for e in epochs], means, "o-", color="tab:blue", markersize=3, label="epoch mean")
        ax.set_yscale("log")
        ax.legend(frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (noise prediction)")
    ax.set_title("Training loss")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def loss_log_path(out_dir: Path) -> Path:
    """The running loss log of the run in `out_dir`: in checkpoints/, not beside the outputs, because Snakemake
    deletes a rule's outputs (loss.csv among them) before a rerun and the history must survive that; it is
    copied to `out_dir`/loss.csv at the end (outputs.py)."""
    return Path(out_dir) / "checkpoints" / "loss.csv"


def prepare_loss_csv(path: Path, keep_until_step: int) -> None:
    """loss.csv with the header and the rows up to the resumed step (later ones are redone)."""
    rows = []
    if keep_until_step > 0 and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and int(r[0]) <= keep_until_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["step", "epoch", "loss", "lr", "samples_per_s"], *rows])


def format_duration(seconds: float | None) -> str:
    """12 s, 7 min 5 s, 3 h 20 min; '?' when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class StepLog:
    """The run as it goes, step by step: timing on every rank; on rank 0 (`write`) also a row of the loss log
    per step and a progress line with the loss, samples/s and the ETA: a tqdm bar on a terminal, else a log
    line every `log_every` steps (what `tail -f` on the rule's or the SLURM job's log shows), and a summary
    line per epoch; and every few seconds the live status file (`LIVE_STATUS`) beside the loss log, which
    `brainddpm train` shows while it waits for the job (launch.py: `LiveStatusWatcher`). The first step of a
    job (warm-up, compilation) is not timed. On rank 0 the loss log starts with the rows kept up to
    `start_step` (a resumed run redoes the later ones).

    `mfu` turns samples/s per process into the model FLOPs utilisation (None where it is unknown): the epoch's
    in the log line, the job's in `mfu` (train.json)."""

    def __init__(self, csv_path: Path, total_steps: int, start_step: int, steps_per_epoch: int,
                 samples_per_step: int, lr: float, log_every: int, write: bool,
                 mfu: Callable[[float | None], float | None] = lambda samples_per_s: None) -> None:
        self.csv_path, self.total_steps, self.samples_per_step = csv_path, total_steps, samples_per_step
        self.lr, self.log_every, self.write, self._mfu = lr, log_every, write, mfu
        if write:
            prepare_loss_csv(csv_path, start_step)
        self.recent: collections.deque = collections.deque(maxlen=steps_per_epoch)  # last epoch's worth of losses
        self.timed_steps, self.timed_s, self.first_step = 0, 0.0, True
        self.epoch_losses: list[float] = []
        self.epoch_s = 0.0
        self.reported_at = 0.0
        self.bar = None
        # a terminal on stderr, or on stdout when stderr goes to a log (the train rule's `2> log`, in-process)
        terminal = next((f for f in (sys.stderr, sys.stdout) if f.isatty()), None) if write else None
        if terminal is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=terminal)

    @property
    def samples_per_s(self) -> float | None:
        """Per process, over the timed steps of this job."""
        return self.timed_steps * self.samples_per_step / self.timed_s if self.timed_s > 0 else None

    @property
    def mfu(self) -> float | None:
        """Over the timed steps of this job."""
        return self._mfu(self.samples_per_s)

    @property
    def final_loss(self) -> float | None:
        """Mean loss over the last epoch's worth of steps."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def eta_s(self, step: int) -> float | None:
        return (self.total_steps - step) * self.timed_s / self.timed_steps if self.timed_steps else None

    def step(self, step: int, epoch: int, loss: float, seconds: float) -> None:
        if not self.first_step:
            self.timed_steps, self.timed_s = self.timed_steps + 1, self.timed_s + seconds
        self.first_step = False
        self.recent.append(loss)
        self.epoch_losses.append(loss)
        self.epoch_s += seconds
        if not self.write:
            return
        rate = self.samples_per_step / seconds
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step, epoch, f"{loss:.6g}", self.lr, f"{rate:.4g}"])
        if time.monotonic() - self.reported_at >= 5.0 or step == self.total_steps:
            self.reported_at = time.monotonic()
            state = {"step": step, "total_steps": self.total_steps, "epoch": epoch, "loss": loss,
                     "samples_per_s": self.samples_per_s or rate, "eta_s": self.eta_s(step), "time": time.time()}
            with atomic_path(self.csv_path.parent / LIVE_STATUS) as tmp:
                tmp.write_text(json.dumps(state))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}", samples_s=f"{rate:.3g}")
        if (self.bar is None or not sys.stderr.isatty()) and (step % self.log_every == 0 or step == self.total_steps):
            log.info("step %d/%d epoch %d loss %.5g lr %.3g %.3g samples/s/process ETA %s", step, self.total_steps,
                     epoch, loss, self.lr, rate, format_duration(self.eta_s(step)))

    def end_epoch(self, epoch: int, peak_memory_bytes: int) -> None:
        if self.write and self.epoch_losses:
            mfu = self._mfu(self.epoch_samples_per_s)
            log.info("epoch %d: mean loss %.5g, %.3g samples/s per process, MFU %s, peak memory %.3g GiB", epoch,
                     sum(self.epoch_losses) / len(self.epoch_losses), self.epoch_samples_per_s,
                     "n/a" if mfu is None else f"{mfu:.1%}", peak_memory_bytes / 2**30)
        self.epoch_losses, self.epoch_s = [], 0.0

    @property
    def epoch_samples_per_s(self) -> float | None:
        return len(self.epoch_losses) * self.samples_per_step / self.epoch_s if self.epoch_s > 0 else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
