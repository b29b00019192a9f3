"""What every report section shares: interval formatting, markdown tables and saving a figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainddpm.fileio import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (jobs run without a display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: Path, dpi: int) -> None:
    """Lay out, write under a temporary name, rename, close."""
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)


def fmt(entry: dict | None, digits: int = 3, signed: bool = False) -> str:
    """value [ci_low–ci_high]; signed: every number with its sign (a difference)."""
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "–"
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{entry['value']:{spec}} [{entry['ci_low']:{spec}}–{entry['ci_high']:{spec}}]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
