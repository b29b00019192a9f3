"""Covariates for conditional generation: how they are read, encoded for the network, and planned for sampling.

The `condition` config section lists covariates from the participants tables (continuous ones such as
age, categorical ones such as sex, diagnosis or dataset). They travel manifest -> split -> shards as raw
values; training fits a `CovariateEncoding` on the training split alone and stores it in the final model,
so sampling needs nothing else.

The encoding is the vector MONAI's DiffusionModelUNet takes as cross-attention `context` (shape
[B, 1, dim]); per covariate:

* continuous: ``[(value - mean) / std, 1]`` with the training split's mean and std;
* categorical: a one-hot over the training split's categories, then ``1``;
* missing (no value, or left unspecified in a sampling stratum): zeros, the trailing "present" flag 0.

Classifier-free guidance (Ho & Salimans 2022) follows MONAI's own convention (`DiffusionInferer.sample`
with `cfg`, `cfg_fill_value=-1`): the null condition is the vector filled with -1, which no real or
partly missing condition can equal (their present flags are 0 or 1). During training the whole vector is
replaced by the null condition with probability `condition.drop_prob`; when sampling, the model's output
is ``uncond + w * (cond - uncond)`` with w = `sample.guidance_scale`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError, ConfigError

NULL_FILL = -1.0  # MONAI DiffusionInferer.sample's cfg_fill_value
MISSING = ("", "n/a", "na", "nan", "none", "null")


def covariate_names(cond_cfg: dict | None) -> list[str]:
    return [c["name"] for c in (cond_cfg or {}).get("covariates", [])]


def is_conditioned(cfg: dict) -> bool:
    """True when the config asks for a conditional model (`condition.covariates` not empty)."""
    return bool(covariate_names(cfg.get("condition")))


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


@dataclass(frozen=True)
class CovariateEncoding:
    """The fitted encoding: per covariate its type and the training split's mean/std or categories."""
    covariates: tuple[dict, ...]

    @property
    def dim(self) -> int:
        return sum(2 if c["type"] == "continuous" else len(c["categories"]) + 1 for c in self.covariates)

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.covariates]

    def to_dict(self) -> dict:
        return {"covariates": [dict(c) for c in self.covariates], "null_fill": NULL_FILL}

    @classmethod
    def from_dict(cls, d: dict) -> "CovariateEncoding":
        return cls(tuple(dict(c) for c in d["covariates"]))

    def vector(self, values: dict, strict: bool = True) -> np.ndarray:
        """The encoded vector of one volume's covariates (missing ones: zeros and present flag 0).

        A category the training split never had cannot be encoded: a ConfigError naming it when `strict`,
        else the covariate is treated as missing.
        """
        out = []
        for c in self.covariates:
            v = values.get(c["name"])
            if c["type"] == "continuous":
                out += [0.0, 0.0] if v is None else [(float(v) - c["mean"]) / c["std"], 1.0]
                continue
            hot = [0.0] * len(c["categories"])
            if v is not None and str(v) in c["categories"]:
                hot[c["categories"].index(str(v))] = 1.0
                out += hot + [1.0]
            elif v is None or not strict:
                out += hot + [0.0]
            else:
                raise ConfigError(f"covariate '{c['name']}': {v!r} is not among the training split's categories "
                                  f"{c['categories']}")
        return np.asarray(out, dtype=np.float32)

    def vectors(self, rows: list[dict], strict: bool = True) -> np.ndarray:
        """(N, 1, dim) context for N volumes' covariate dicts."""
        return np.stack([self.vector(r, strict) for r in rows])[:, None, :] if rows else \
            np.zeros((0, 1, self.dim), np.float32)


def fit_encoding(cond_cfg: dict, covariates: list[dict], source: str = "the training split") -> CovariateEncoding:
    """Fit the encoding on the training volumes' covariates (list of {name: value or None})."""
    fitted = []
    for c in cond_cfg["covariates"]:
        values = [r.get(c["name"]) for r in covariates if r.get(c["name"]) is not None]
        if not values:
            raise BadInputError(source, f"no volume has a value for covariate '{c['name']}'")
        if c["type"] == "continuous":
            arr = np.asarray(values, dtype=np.float64)
            std = float(arr.std())
            fitted.append({"name": c["name"], "type": "continuous", "mean": float(arr.mean()),
                           "std": std if std > 0 else 1.0})
        else:
            fitted.append({"name": c["name"], "type": "categorical",
                           "categories": sorted({str(v) for v in values})})
    return CovariateEncoding(tuple(fitted))


# ---- sampling plans: which covariates each synthetic volume is asked for ----

def _stratum_label(stratum: dict) -> str:
    parts = []
    for k, v in stratum.items():
        if k == "n":
            continue
        parts.append(f"{k}={v[0]:g}-{v[1]:g}" if isinstance(v, list) else f"{k}={v:g}" if isinstance(v, (int, float))
                     else f"{k}={v}")
    return ", ".join(parts) or "all"


def plan_strata(strata: list[dict], encoding: CovariateEncoding) -> list[dict]:
    """One entry per synthetic volume for explicit strata, in order.

    A continuous range [lo, hi] gives the stratum's n volumes evenly spaced values from lo to hi; a
    single value is used as is. A covariate a stratum does not name is balanced over the training
    categories (categorical: round robin) or set to the training mean (continuous), never left to chance.
    """
    plan = []
    for s_index, stratum in enumerate(strata):
        unknown = set(stratum) - set(encoding.names) - {"n"}
        if unknown:
            raise ConfigError(f"config key 'sample.conditions[{s_index}]': {sorted(unknown)} are not covariates of "
                              f"the model (it was trained on {encoding.names})")
        n = int(stratum["n"])
        for j in range(n):
            values = {}
            for c in encoding.covariates:
                v = stratum.get(c["name"])
                if c["type"] == "continuous":
                    if isinstance(v, list):
                        lo, hi = float(v[0]), float(v[1])
                        v = lo if n == 1 else lo + (hi - lo) * j / (n - 1)
                    values[c["name"]] = round(float(c["mean"] if v is None else v), 4)
                else:
                    values[c["name"]] = c["categories"][j % len(c["categories"])] if v is None else str(v)
            encoding.vector(values)  # raises on a category the model never saw
            plan.append({"covariates": values, "stratum": _stratum_label(stratum)})
    return plan


def plan_match_validation(n: int, val_covariates: list[dict], encoding: CovariateEncoding) -> list[dict]:
    """Synthetic volume i asks for the covariates of validation volume i (cycling when n is larger)."""
    if not val_covariates:
        raise BadInputError("validation shards", "no validation volume to take covariates from")
    plan = []
    for i in range(n):
        row = val_covariates[i % len(val_covariates)]
        values = {}
        for c in encoding.covariates:  # a category the training split lacks cannot be asked for: missing
            v = row.get(c["name"])
            values[c["name"]] = None if c["type"] == "categorical" and v is not None and str(v) not in \
                c["categories"] else v
        plan.append({"covariates": values, "stratum": "match_validation"})
    return plan


def build_plan(sample_cfg: dict, encoding: CovariateEncoding, val_covariates: list[dict]) -> dict:
    """The sampling plan (conditions.json): the guidance scale and per volume index its covariates and stratum."""
    conditions = sample_cfg.get("conditions", "match_validation")
    if conditions == "match_validation":
        volumes = plan_match_validation(sample_cfg["n"], val_covariates, encoding)
    else:
        volumes = plan_strata(conditions, encoding)
    if len(volumes) != sample_cfg["n"]:
        raise ConfigError(f"config key 'sample.n': {sample_cfg['n']}, but the strata of sample.conditions ask for "
                          f"{len(volumes)} volumes")
    return {"mode": "match_validation" if conditions == "match_validation" else "strata",
            "guidance_scale": float(sample_cfg.get("guidance_scale", 1.0)), "encoding": encoding.to_dict(),
            "volumes": [{"index": i, **v} for i, v in enumerate(volumes)]}


def read_plan(path: Path) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
        plan["volumes"]
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(path, f"not a readable sampling plan ({exc})") from None
    return plan
