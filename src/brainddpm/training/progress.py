"""Figures written by the workflow (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from brainddpm.fileio import atomic_path


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
