import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers import GRID, TARGET, base_config, brain_volume, write_nifti

from brainddpm.data.nifti import grid_affine, load_checked, preprocess, save_volume, target_affine
from brainddpm.errors import BadInputError


def test_preprocess_on_grid(tmp_path):
    cfg = base_config()["data"]
    vol = brain_volume(1)
    out, stats = preprocess(write_nifti(tmp_path / "a.nii.gz", vol), cfg)
    assert out.shape == tuple(TARGET) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() <= 1.0 and out.max() > 0.9
    corner = out[0, 0, 0]
    assert corner == 0.0  # background stays exactly zero
    assert stats["mask_voxels"] == int((vol > 0).sum())


def test_reorient_and_resample_match_grid(tmp_path):
    """A LAS image and a 2 mm image of the same brain land on the same grid as the RAS 1 mm original."""
    cfg = base_config()["data"]
    vol = brain_volume(2)
    ras = preprocess(write_nifti(tmp_path / "ras.nii.gz", vol), cfg)[0]
    affine = grid_affine(GRID["shape"], GRID["spacing"], GRID["origin"])
    flip = affine.copy()
    flip[0, 0] = -1
    flip[0, 3] = GRID["origin"][0] + GRID["shape"][0] - 1
    las = preprocess(write_nifti(tmp_path / "las.nii.gz", vol[::-1]), cfg)[0]
    las_img = write_nifti(tmp_path / "las2.nii.gz", vol[::-1], flip)
    assert nib.aff2axcodes(nib.load(las_img).affine)[0] == "L"
    las = preprocess(las_img, cfg)[0]
    np.testing.assert_allclose(las, ras, atol=1e-5)
    # a copy shifted by 2 voxels in the world is resampled back (different origin => resampling)
    shifted = affine.copy()
    shifted[:3, 3] += [2, 0, 0]
    moved = preprocess(write_nifti(tmp_path / "moved.nii.gz", np.roll(vol, -2, axis=0), shifted), cfg)[0]
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(moved[inner], ras[inner], atol=0.05)


def test_target_affine_keeps_field_of_view():
    cfg = base_config()["data"]
    aff = target_affine(cfg)
    src = grid_affine(GRID["shape"], GRID["spacing"], GRID["origin"])
    # the outer corners of the two grids coincide
    lo_src = src @ [-0.5, -0.5, -0.5, 1]
    lo_dst = aff @ [-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(lo_src, lo_dst, atol=1e-6)
    hi_src = src @ [*(np.array(GRID["shape"]) - 0.5), 1]
    hi_dst = aff @ [*(np.array(TARGET) - 0.5), 1]
    np.testing.assert_allclose(hi_src, hi_dst, atol=1e-6)


def test_save_volume_atomic_and_readable(tmp_path):
    aff = target_affine(base_config()["data"])
    save_volume(np.ones(TARGET, np.float32), aff, tmp_path / "x.nii.gz")
    img = nib.load(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(img.affine, aff)
    assert img.header["sform_code"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def _bad(tmp_path, kind):
    p = tmp_path / f"{kind}.nii.gz"
    vol = brain_volume(3)
    if kind == "truncated":
        write_nifti(p, vol)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        p.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    elif kind == "4d":
        write_nifti(p, np.stack([vol, vol], axis=-1))
    elif kind == "nan":
        vol[5, 5, 5] = np.nan
        vol[6, 6, 6] = np.inf
        write_nifti(p, vol)
    elif kind == "zero":
        write_nifti(p, np.zeros_like(vol))
    elif kind == "2d":
        write_nifti(p, vol[:, :, 10])
    elif kind == "missing":
        pass
    elif kind == "notnifti":
        p = tmp_path / "notes.txt"
        p.write_text("hello")
    return p


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "truncated or corrupt"), ("corrupt", "cannot read"), ("4d", "4D image"),
    ("nan", "NaN or Inf"), ("zero", "all voxels are zero"), ("2d", "2D"), ("missing", "does not exist"),
    ("notnifti", "not a NIfTI"),
])
def test_bad_inputs_are_named(tmp_path, kind, reason):
    path = _bad(tmp_path, kind)
    with pytest.raises(BadInputError) as err:
        load_checked(path)
    assert reason in str(err.value)
    assert str(path) in str(err.value)
