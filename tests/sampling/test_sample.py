
import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from brainddpm.data.nifti import target_affine
from brainddpm.errors import BrainDDPMError
from brainddpm.models.diffusion import build_model
from brainddpm.models.final import save_final
from brainddpm.sampling.sample import part_batches
from helpers import base_config, sample_jobs


def untrained_model(cfg: dict, folder) -> tuple[dict, object]:
    """An untrained network of `cfg` saved as a final model file (step 7); (cfg, its path)."""
    torch.manual_seed(0)
    net = build_model(cfg["model"])
    path = folder / "model.safetensors"
    data = {"target_shape": cfg["data"]["target_shape"], "affine": target_affine(cfg["data"]).tolist(),
            "intensity_range": [0.0, 1.0]}
    save_final(path, net.state_dict(), {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data}, step=7)
    return cfg, path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return untrained_model(base_config(scheduler={"num_train_timesteps": 20}), tmp_path_factory.mktemp("ckpt"))


def test_part_batches_cover_every_volume_once():
    for jobs in (1, 2, 3):
        got = [i for p in range(jobs) for b in part_batches(7, 2, jobs, p) for i in b]
        assert got == list(range(7))
    with pytest.raises(BrainDDPMError, match="sample.jobs"):
        part_batches(4, 4, 2, 0)


def test_sampling_is_identical_for_one_and_three_jobs(checkpoint, tmp_path):
    cfg, ckpt = checkpoint
    a, names_a = sample_jobs(cfg, ckpt, tmp_path, 1)
    b, names_b = sample_jobs(cfg, ckpt, tmp_path, 3)
    assert names_a == names_b == [f"synthetic-{i:04d}" for i in range(6)]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 1, 8, 12, 8) and a.min() >= 0 and a.max() <= 1
    assert not np.allclose(a[0], a[1])  # different seeds, different volumes


def test_nifti_outputs_carry_the_target_affine(checkpoint, tmp_path):
    cfg, ckpt = checkpoint
    sample_jobs(cfg, ckpt, tmp_path, 2, sampler="ddim")
    files = sorted((tmp_path / "j2").glob("nifti-*/*.nii.gz"))
    assert len(files) == 6
    img = nib.load(files[0])
    np.testing.assert_allclose(img.affine, target_affine(cfg["data"]))
    assert img.shape == (8, 12, 8) and img.header["sform_code"] == 4
    with h5py.File(tmp_path / "j2" / "part-000.h5") as f:
        assert f.attrs["sampler"] == "ddim" and f.attrs["steps"] == 5
        np.testing.assert_allclose(f["affine"][()], target_affine(cfg["data"]))
    assert (tmp_path / "j2" / "s.png").stat().st_size > 1000


def test_a_synthetic_volume_is_copied_onto_the_mni_grid(checkpoint, tmp_path):
    from brainddpm.sampling.sample import resample_to_grid

    cfg, ckpt = checkpoint
    sample_jobs(cfg, ckpt, tmp_path, 1)
    src = sorted((tmp_path / "j1" / "nifti-000").glob("*.nii.gz"))[0]
    grid = cfg["data"]["grid"]
    out = resample_to_grid(src, grid, tmp_path / "mni")
    img, orig = nib.load(out), nib.load(src)
    assert img.shape == tuple(grid["shape"]) and np.allclose(img.header.get_zooms(), grid["spacing"])
    assert np.allclose(img.affine[:3, 3], grid["origin"]) and int(img.header["sform_code"]) == 4
    data, small = np.asarray(img.dataobj), np.asarray(orig.dataobj)
    assert 0 <= data.min() and data.max() <= 1 and abs(data.mean() - small.mean()) < 0.05 * max(small.mean(), 1e-3)


RFLOW = {"scheduler": {"num_train_timesteps": 20, "kind": "rflow"}, "sample": {"samplers": ["rflow"]}}


@pytest.fixture(scope="module")
def rflow_checkpoint(tmp_path_factory):
    """An untrained network saved as a rectified-flow model (scheduler.kind: rflow)."""
    return untrained_model(base_config(**RFLOW), tmp_path_factory.mktemp("rflow"))


def test_rflow_sampling_is_identical_for_one_and_three_jobs(rflow_checkpoint, tmp_path):
    cfg, ckpt = rflow_checkpoint
    a, names_a = sample_jobs(cfg, ckpt, tmp_path, 1, sampler="rflow")
    b, _ = sample_jobs(cfg, ckpt, tmp_path, 3, sampler="rflow")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    with h5py.File(tmp_path / "j1" / "part-000.h5") as f:
        assert f.attrs["sampler"] == "rflow" and f.attrs["steps"] == 5


def test_a_sampler_of_the_other_scheduler_kind_is_refused_naming_both(checkpoint, rflow_checkpoint, tmp_path):
    from brainddpm.errors import ConfigError

    cfg, ckpt = rflow_checkpoint
    with pytest.raises(ConfigError, match="the ddim sampler cannot sample a model trained with scheduler.kind rflow"):
        sample_jobs(cfg, ckpt, tmp_path, 1, sampler="ddim")
    cfg, ckpt = checkpoint
    with pytest.raises(ConfigError, match="the rflow sampler cannot sample a model trained with scheduler.kind ddpm"):
        sample_jobs(cfg, ckpt, tmp_path, 1, sampler="rflow")
    with pytest.raises(ConfigError, match="sample.samplers': ddim cannot sample a model trained with scheduler.kind: "
                                          "rflow; its samplers: rflow"):
        base_config(scheduler={"kind": "rflow"}, sample={"samplers": ["ddim"]})


def test_masked_sampling_writes_each_mask_beside_its_volume_and_keeps_the_raw_volumes(checkpoint, tmp_path):
    """sample.background: mask: 0 outside each volume's mask, the mask as NIfTI beside it, the unmasked volumes
    in the part as raw_images (what the realism probe reads as `whole_unmasked`)."""
    import json

    from brainddpm.data.shards import read_raw_volumes
    from brainddpm.errors import ConfigError
    from brainddpm.sampling.sample import run_sample

    cfg, ckpt = checkpoint
    rule = tmp_path / "mask_rule.json"
    rule.write_text(json.dumps({"threshold": 0.3, "dilate": 0}))
    sample_cfg = {**cfg["sample"], "n": 2, "batch": 2, "jobs": 1, "device": "cpu", "ddim_steps": 5,
                  "background": "mask"}
    with pytest.raises(ConfigError, match="sample.background"):
        run_sample(sample_cfg, ckpt, "ddim", 0, tmp_path / "p.h5", tmp_path / "nifti")
    run_sample(sample_cfg, ckpt, "ddim", 0, tmp_path / "part-000.h5", tmp_path / "nifti", mask_rule=rule)
    with h5py.File(tmp_path / "part-000.h5") as f:
        masked, background = f["images"][()], f.attrs["background"]
    raw = read_raw_volumes([tmp_path / "part-000.h5"])
    mask = nib.load(tmp_path / "nifti" / "synthetic-0000_ddim_mask.nii.gz")
    inside = np.asarray(mask.dataobj).astype(bool)
    assert background == "mask" and mask.get_data_dtype() == np.uint8 and inside.any() and not inside.all()
    assert np.all(masked[0, 0][~inside] == 0) and np.array_equal(masked[0, 0][inside], raw[0, 0][inside])
    assert raw[0, 0][~inside].max() > 0  # an untrained network's haze, kept in raw_images
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "nifti" / "synthetic-0000_ddim.nii.gz").dataobj),
                                  masked[0, 0])
