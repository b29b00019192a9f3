"""The sampling plan of a conditional model: which covariates each synthetic volume asks for.

`run_condition_plan` (rule `condition_plan`, `brainddpm condition-plan`) writes conditions.json from
`sample.conditions`: `match_validation` gives synthetic volume i the covariates of validation volume i
(cycling), `match_training` those of training volume i (the utility stage's plan: the validation split is its
test set, whose covariates must not shape the synthetic data); explicit strata such as
``{age: [70, 80], sex: F, n: 43}`` give n volumes each, a range as evenly spaced values and unnamed covariates
balanced. The plan records the model's covariate encoding, so a
sampling job refuses a plan made for another model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from brainddpm.data.shards import read_meta, split_files
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.fileio import atomic_path
from brainddpm.models.conditioning import CovariateEncoding
from brainddpm.models.final import read_final

log = logging.getLogger(__name__)


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


def plan_match(n: int, covariates: list[dict], encoding: CovariateEncoding, split: str = "validation") -> list[dict]:
    """Synthetic volume i asks for the covariates of volume i of `split` (cycling when n is larger)."""
    if not covariates:
        raise BadInputError(f"{split} shards", f"no {split} volume to take covariates from")
    plan = []
    for i in range(n):
        row = covariates[i % len(covariates)]
        values = {}
        for c in encoding.covariates:  # a category the training split lacks cannot be asked for: missing
            v = row.get(c["name"])
            values[c["name"]] = None if c["type"] == "categorical" and v is not None and str(v) not in \
                c["categories"] else v
        plan.append({"covariates": values, "stratum": f"match_{split}"})
    return plan


def plan_match_validation(n: int, val_covariates: list[dict], encoding: CovariateEncoding) -> list[dict]:
    """Synthetic volume i asks for the covariates of validation volume i (cycling when n is larger)."""
    return plan_match(n, val_covariates, encoding, "validation")


def build_plan(sample_cfg: dict, encoding: CovariateEncoding, val_covariates: list[dict],
               train_covariates: list[dict] | None = None) -> dict:
    """The sampling plan (conditions.json): the guidance scale and per volume index its covariates and stratum.

    `train_covariates` (the training split's, in shard order) are needed by `match_training` only."""
    conditions = sample_cfg.get("conditions", "match_validation")
    if conditions == "match_validation":
        volumes = plan_match_validation(sample_cfg["n"], val_covariates, encoding)
    elif conditions == "match_training":
        if train_covariates is None:
            raise ConfigError("config key 'sample.conditions': match_training needs the training split (--train)")
        volumes = plan_match(sample_cfg["n"], train_covariates, encoding, "training")
    else:
        volumes = plan_strata(conditions, encoding)
    if len(volumes) != sample_cfg["n"]:
        raise ConfigError(f"config key 'sample.n': {sample_cfg['n']}, but the strata of sample.conditions ask for "
                          f"{len(volumes)} volumes")
    return {"mode": conditions if isinstance(conditions, str) else "strata",
            "guidance_scale": float(sample_cfg.get("guidance_scale", 1.0)), "encoding": encoding.to_dict(),
            "volumes": [{"index": i, **v} for i, v in enumerate(volumes)]}


def read_plan(path: Path) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
        plan["volumes"]
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(path, f"not a readable sampling plan ({exc})") from None
    return plan


def _split_covariates(split_dir: Path) -> list[dict]:
    return [m.get("covariates", {}) for f in split_files(split_dir) for m in read_meta(f)]


def run_condition_plan(sample_cfg: dict, checkpoint: Path, val_dir: Path, out: Path,
                       train_dir: Path | None = None) -> dict:
    """Write the sampling plan (conditions.json) of a conditional model: per synthetic volume the covariates
    it is asked for (`sample.conditions`: match_validation, match_training (needs `train_dir`) or explicit
    strata) and the guidance scale."""
    config, _ = read_final(checkpoint, tensors=False)
    if "condition" not in config:
        raise BadInputError(checkpoint, "an unconditional model: there are no covariates to plan")
    encoding = CovariateEncoding.from_dict(config["condition"])
    val = _split_covariates(val_dir)
    plan = build_plan(sample_cfg, encoding, val, _split_covariates(train_dir) if train_dir is not None else None)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(plan, indent=1))
    strata = sorted({v["stratum"] for v in plan["volumes"]})
    log.info("plan: %d volumes (%s), guidance scale %g", len(plan["volumes"]), "; ".join(strata),
             plan["guidance_scale"])
    return plan
