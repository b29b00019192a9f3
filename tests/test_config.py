import pytest
import yaml
from helpers import ROOT, base_config

from brainddpm.config import deep_merge, load_config, validate_config
from brainddpm.errors import ConfigError


def test_shipped_configs_are_valid():
    load_config([ROOT / "config" / "config.yaml"]) if yaml.safe_load(
        (ROOT / "config" / "config.yaml").read_text())["datasets"] else None
    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml"])
    assert cfg["model"]["channels"] == [16, 16, 32]
    assert cfg["scheduler"]["beta_start"] == 0.0005  # inherited from the reference config


@pytest.mark.parametrize("override,key", [
    ({"train": {"lrr": 1}}, "train.lrr"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"data": {"target_shape": [84, 128, 85]}}, "data.target_shape"),
    ({"model": {"channels": [8, 8, 12]}}, "model.channels"),
    ({"model": {"num_head_channels": 3}}, "model.num_head_channels"),
    ({"model": {"attention_levels": [False, True]}}, "model.attention_levels"),
    ({"data": {"dtype": "int8"}}, "data.dtype"),
    ({"evaluate": {"msssim": {"kernel_size": 11, "scales": 5}}}, "evaluate.msssim"),
    ({"bogus": 1}, "bogus"),
])
def test_config_errors_name_the_key(override, key):
    cfg = base_config()
    with pytest.raises(ConfigError) as err:
        validate_config(deep_merge(cfg, override))
    assert f"'{key}" in str(err.value)


def test_reference_msssim_fits_reference_shape():
    """Kernel 5 with 5 scales fits 84x128x84; MONAI's default kernel 11 does not."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"] = [{"name": "x", "root": "x"}]
    validate_config(cfg)
    cfg["evaluate"]["msssim"]["kernel_size"] = 11
    with pytest.raises(ConfigError, match="evaluate.msssim"):
        validate_config(cfg)


def test_partial_config_checks_the_sections_present():
    cfg = base_config()
    part = {k: cfg[k] for k in ("seed", "model", "scheduler", "train")}
    assert validate_config(part, partial=True) is part
    with pytest.raises(ConfigError, match="'model.channels'"):
        validate_config({**part, "model": {**cfg["model"], "channels": [8, 8, 12]}}, partial=True)
    with pytest.raises(ConfigError, match="missing"):
        validate_config(part)  # a full config needs every section
