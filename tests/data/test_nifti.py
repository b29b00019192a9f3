import gzip

import nibabel as nib
import numpy as np
import pytest

from brainddpm.data.nifti import grid_affine, load_checked, preprocess, save_volume, target_affine
from brainddpm.errors import BadInputError
from helpers import GRID, TARGET, base_config, brain_volume, write_nifti


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


def test_images_on_fmriprep_s_mni_grids_come_onto_the_configured_one():
    """The figures of docs/benchmarks.md, "Input grids": the template brain on the configured 1 mm grid is the
    reference; the same brain on fMRIPrep's MNI152NLin2009cAsym grids (1 mm: 193x229x193 from (-96, -132, -78);
    res-2: 97x115x97 at 2 mm) is brought back by `to_grid`, then normalised as the shards do. The 1 mm grid is
    the same lattice, 6 mm further out: exact. 2 mm costs what 2 mm lost; a half-voxel shift, what trilinear
    interpolation blurs."""
    from pathlib import Path

    import nilearn
    from nibabel.processing import resample_from_to

    from brainddpm.data.nifti import normalize, to_grid
    from brainddpm.data.qc import TEMPLATE

    data_cfg = base_config()["data"] | {"grid": {"shape": [181, 217, 181], "spacing": [1.0, 1.0, 1.0],
                                                 "origin": [-90.0, -126.0, -72.0]}}
    grid = data_cfg["grid"]
    target = (tuple(grid["shape"]), grid_affine(grid["shape"], grid["spacing"], grid["origin"]))
    template = nib.load(Path(nilearn.__file__).parent / TEMPLATE)
    reference = np.asarray(resample_from_to(template, target, order=1).dataobj, np.float32)
    reference[reference < 0.02 * reference.max()] = 0
    brain = reference > 0
    truth, _ = normalize(reference, brain, 0.5, 99.5)
    on_reference = nib.Nifti1Image(reference, target[1])
    fmriprep = {"1 mm": ((193, 229, 193), 1.0), "res-2": ((97, 115, 97), 2.0)}
    figures = {}
    for name, (shape, spacing) in fmriprep.items():
        affine = grid_affine(shape, (spacing,) * 3, (-96.0, -132.0, -78.0))
        moved = resample_from_to(on_reference, (shape, affine), order=1)
        back = to_grid(moved, np.asarray(moved.dataobj, np.float32), data_cfg)
        figures[name] = normalize(back, brain, 0.5, 99.5)[0]
    shifted = nib.Nifti1Image(reference, target[1] @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                  [0, 0, 0, 1.0]]))
    half = to_grid(shifted, reference, data_cfg)
    figures["half-voxel shift"] = normalize(half, brain, 0.5, 99.5)[0]
    for name, vol in figures.items():
        error = np.abs(vol[brain] - truth[brain])
        r = np.corrcoef(vol[brain], truth[brain])[0, 1]
        print(f"{name}: MAE {error.mean():.4f}, p99 {np.percentile(error, 99):.4f}, r {r:.4f}")
    assert np.array_equal(figures["1 mm"], truth)  # the same lattice: nothing is interpolated
    assert 0 < np.abs(figures["res-2"][brain] - truth[brain]).mean() < 0.05
