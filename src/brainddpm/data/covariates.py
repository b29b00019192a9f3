"""Covariates as the data stage reads them from participants tables: raw values parsed per covariate type.

They travel manifest -> split -> shards as raw values (a `covariates` dataset of per-volume JSON in the
shards); the network's encoding of them is fitted later, on the training split (models/conditioning.py).
"""

from __future__ import annotations

import math

MISSING = ("", "n/a", "na", "nan", "none", "null")


def parse_value(cov: dict, raw) -> float | str | None:
    """A raw table value as the covariate's type; None when missing; ValueError naming the covariate."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw).strip().lower() in MISSING:
        return None
    if cov["type"] == "continuous":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"covariate '{cov['name']}' = {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"covariate '{cov['name']}' = {raw!r} is not finite")
        return value
    return str(raw).strip()


def read_covariates(cond_cfg: dict, row: dict) -> dict:
    """{name: parsed value or None} of one participants/manifest row."""
    return {c["name"]: parse_value(c, row.get(c["name"])) for c in cond_cfg["covariates"]}

