import pytest
import yaml

from brainddpm.config import deep_merge, load_config, validate_config
from brainddpm.errors import ConfigError
from helpers import ROOT, base_config


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


LATENT = {"model": {"kind": "latent"}, "data": {"target_shape": [20, 24, 20]},
          "autoencoder": {"channels": [4, 8, 8], "norm_num_groups": 4, "attention_levels": [False] * 3,
                          "pad_multiple": 16}}


@pytest.mark.parametrize("override,key,says", [
    ({"autoencoder": {"pad_multiple": 6}}, "autoencoder.pad_multiple", "compression factor 4"),
    ({"autoencoder": {"pad_multiple": 8}}, "autoencoder.pad_multiple", "set pad_multiple to a multiple of 16"),
    ({"autoencoder": {"patch": [16, 16, 10]}}, "autoencoder.patch", "divisible by the compression factor 4"),
    ({"autoencoder": {"attention_levels": [False, False]}}, "autoencoder.attention_levels", "has 2 entries"),
    ({"autoencoder": {"channels": [4, 8, 6]}}, "autoencoder.channels", "norm_num_groups=4"),
    ({"autoencoder": {"train": {"epoch": 3}}}, "autoencoder.train.epoch", "unknown key"),
    ({"autoencoder": {"train": {"lr": -1}}}, "autoencoder.train.lr", ""),
    ({"model": {"kind": "latents"}}, "model.kind", ""),
], ids=["pad-compression", "pad-unet", "patch", "attention", "groups", "train-key", "train-value", "kind"])
def test_latent_config_errors_name_the_key(override, key, says):
    cfg = deep_merge(base_config(), LATENT)
    validate_config(cfg)  # the tiny latent config itself is valid: 20x24x20 -> padded 32^3 -> latents 8^3
    with pytest.raises(ConfigError) as err:
        validate_config(deep_merge(cfg, override))
    assert f"config key '{key}'" in str(err.value) and says in str(err.value)


def test_latent_model_needs_the_autoencoder_and_decode_sections():
    cfg = deep_merge(base_config(), LATENT)
    del cfg["decode"]
    with pytest.raises(ConfigError, match="config key 'decode': missing"):
        validate_config(cfg)


def test_pixel_models_ignore_the_latent_sections():
    cfg = deep_merge(base_config(), {"autoencoder": {"pad_multiple": 6}})  # wrong, but unused by a pixel model
    assert validate_config(cfg)["model"]["kind"] == "pixel"
