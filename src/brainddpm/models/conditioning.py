"""Covariates for conditional generation: how they are encoded for the network (data/covariates.py reads
them from the participants tables, sampling/plan.py plans them for sampling).

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

from dataclasses import dataclass

import numpy as np

from brainddpm.errors import BadInputError, ConfigError

NULL_FILL = -1.0  # MONAI DiffusionInferer.sample's cfg_fill_value


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
    def from_dict(cls, d: dict) -> CovariateEncoding:
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
