
import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import base_config, sample_jobs

from brainddpm.data.nifti import target_affine
from brainddpm.errors import BrainDDPMError
from brainddpm.models.diffusion import build_model
from brainddpm.models.final import save_final
from brainddpm.sampling.sample import part_batches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = base_config(scheduler={"num_train_timesteps": 20})
    torch.manual_seed(0)
    net = build_model(cfg["model"])
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    data = {"target_shape": cfg["data"]["target_shape"], "affine": target_affine(cfg["data"]).tolist(),
            "intensity_range": [0.0, 1.0]}
    save_final(path, net.state_dict(), {"model": cfg["model"], "scheduler": cfg["scheduler"], "data": data}, step=7)
    return cfg, path


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
