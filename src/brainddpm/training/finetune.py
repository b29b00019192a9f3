"""Fine-tuning: a diffusion run that starts from an earlier brain-ddpm model instead of random weights.

The rare-cohort case: a base model trained on many controls, then a few dozen patients. `finetune.init_from`
names the base (a run name of this results folder, whose model the workflow trains first, or a path to a
model.safetensors made by brain-ddpm). Everything else is an ordinary training run: the same loop, engine,
backends, precision, checkpoints, exact resume and launcher; its budget and learning rate are the run's
`train.max_steps` (or epochs) and `train.lr`.

* The base must be the same network: the model section (channels, levels, attention, ...), the scheduler
  (kind and schedule) and the data it models (image shape, or latent shape, scale factor and the autoencoder's
  sha256). A difference is refused, naming the key and both values.
* A conditional base keeps its covariate encoding (the same means, spreads and categories), so the fine-tuned
  model reads the same condition vectors; the run must condition on the same covariates. Adding conditioning
  (or new categories) at fine-tuning time is not supported: it is refused, not improvised.
* Latent models are not fine-tuned yet (refused at startup, config.py): the run would train its own
  autoencoder, whose latents the base never saw; reusing the base's autoencoder is left to do.
* `finetune.freeze`: parameter-name prefixes of MONAI's DiffusionModelUNet (`conv_in`, `time_embed`,
  `down_blocks`, `down_blocks.0`, `middle_block`, `up_blocks`, `out`) whose parameters keep the base's values:
  they get no gradient and are not in the optimizer. A prefix that names no parameter is refused.
* The EMA starts at the base's (EMA) weights, with the decay's warm-up restarted from step 0 (engine.py).
* Provenance: the final model and train.json record the base's path, run name, sha256 and step; a resumed
  fine-tuning run whose base file changed since its checkpoint is refused (checkpoint.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from brainddpm.config import finetune_base_path, scheduler_section
from brainddpm.errors import CheckpointError, ConfigError
from brainddpm.fileio import sha256_file
from brainddpm.models.conditioning import CovariateEncoding
from brainddpm.models.final import read_final

log = logging.getLogger(__name__)

DATA_KEYS = ("target_shape", "latent_shape", "scale_factor", "autoencoder_sha256")  # what the network models


@dataclass(frozen=True)
class Base:
    """The model a fine-tuning run starts from."""
    path: Path
    sha256: str
    config: dict
    weights: dict[str, torch.Tensor]

    @property
    def encoding(self) -> CovariateEncoding | None:
        return CovariateEncoding.from_dict(self.config["condition"]) if "condition" in self.config else None

    def provenance(self) -> dict:
        """What the fine-tuned model records of its base."""
        run = self.path.parent.name if self.path.name == "model.safetensors" else None
        return {"path": str(self.path), "run": run, "sha256": self.sha256, "step": self.config.get("step")}


def read_base(cfg: dict) -> Base | None:
    """The base model of a fine-tuning run (None for a run from scratch); a missing or foreign file is an error
    naming the key."""
    path = finetune_base_path(cfg)
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"config key 'finetune.init_from': {path} does not exist (train the base run first)")
    try:
        config, weights = read_final(path)
    except CheckpointError as exc:
        raise ConfigError(f"config key 'finetune.init_from': {exc}") from None
    if config.get("kind") == "autoencoder":
        raise ConfigError(f"config key 'finetune.init_from': {path} is an autoencoder, not a diffusion model")
    return Base(path, sha256_file(path), config, weights)


def check_base(base: Base, cfg: dict, data_meta: dict) -> None:
    """Refuse a base that is another network than this run's, naming the key and both values."""
    where = f"config key 'finetune.init_from' ({base.path})"
    ours = {k: v for k, v in cfg["model"].items() if k != "use_flash_attention"}
    theirs = {k: v for k, v in base.config["model"].items() if k != "use_flash_attention"}
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key, "pixel" if key == "kind" else None) != theirs.get(key, "pixel" if key == "kind" else None):
            raise ConfigError(f"{where}: the base has model.{key} {theirs.get(key)!r}, this run {ours.get(key)!r}; "
                              "a fine-tuning run keeps the base's architecture")
    ours, theirs = _scheduler(cfg["scheduler"]), _scheduler(base.config["scheduler"])
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise ConfigError(f"{where}: the base has scheduler.{key} {theirs.get(key)!r}, this run "
                              f"{ours.get(key)!r}; a fine-tuning run keeps the base's scheduler")
    for key in DATA_KEYS:
        mine, its = data_meta.get(key), base.config["data"].get(key)
        if mine != its:
            what = "another autoencoder" if key in ("autoencoder_sha256", "scale_factor") else "other volumes"
            raise ConfigError(f"{where}: the base models {what} (its {key} {its!r}, this run's training data "
                              f"{mine!r})")
    _check_condition(base, cfg, where)


def _scheduler(scheduler: dict) -> dict:
    return {"kind": scheduler.get("kind", "ddpm"), **scheduler_section(scheduler),
            **({"rflow": scheduler.get("rflow")} if scheduler.get("kind") == "rflow" else {})}


def _check_condition(base: Base, cfg: dict, where: str) -> None:
    theirs = [(c["name"], c["type"]) for c in base.encoding.covariates] if base.encoding else []
    ours = [(c["name"], c["type"]) for c in (cfg.get("condition") or {}).get("covariates", [])]
    if theirs != ours:
        raise ConfigError(f"{where}: the base is conditioned on {theirs or 'nothing'}, this run on "
                          f"{ours or 'nothing'} (condition.covariates); a fine-tuning run keeps the base's "
                          "conditioning (adding or removing covariates is not supported)")


def start_from_base(net: torch.nn.Module, base: Base, freeze: list[str]) -> None:
    """Load the base's weights into `net` exactly and freeze the parameters under the `freeze` prefixes."""
    net.load_state_dict({k: v.to(next(net.parameters()).device) for k, v in base.weights.items()}, strict=True)
    names = [name for name, _ in net.named_parameters()]
    for prefix in freeze:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"config key 'finetune.freeze': {prefix!r} names no parameter of the UNet; its "
                              f"top-level parts are {', '.join(tops)} (a prefix may go deeper: down_blocks.0)")
    if all(any(n == p or n.startswith(p + ".") for p in freeze) for n in names):
        raise ConfigError("config key 'finetune.freeze': it freezes every parameter of the UNet; leave some to train")
    frozen = 0
    for name, parameter in net.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in freeze):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    total = sum(p.numel() for p in net.parameters())
    log.info("fine-tuning from %s (step %s, sha256 %s...): %d of %d parameters frozen", base.path,
             base.config.get("step"), base.sha256[:12], frozen, total)
