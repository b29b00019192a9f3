"""`brainddpm preprocess` on raw-like heads that the tests build from the MNI template (data/rawhead.py): tilted
and shifted into a native space, 1.2 x 1.0 x 1.2 mm voxels, a bias field, scalp and skull. Preprocessing must
bring the brain back onto the MNI grid (here at 2 mm, to stay fast), and the cache must make a rerun free."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from brainddpm.cli import main
from brainddpm.data.nifti import grid_affine
from brainddpm.data.preprocess import resolve_settings, run_preprocess, template_path
from brainddpm.data.rawhead import load_brain, make_raw_head
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.fileio import sha256_file

GRID = {"shape": [91, 109, 91], "spacing": [2.0, 2.0, 2.0], "origin": [-90.0, -126.0, -72.0]}
# Two N4 levels instead of four, registration at 3 mm instead of 2: a third of the time, masks as good
FAST = {"n4": {"iterations": [20, 20]}, "registration": {"spacing_mm": 3.0}}
STEPS_WITHOUT_DENOISE = ["n4", "brain_extraction", "registration", "resample", "n4_in_mask", "qc"]


def outputs(root) -> dict:
    return {"brain_out": root / "brain.nii.gz", "mask_out": root / "mask.nii.gz",
            "transform_out": root / "transform.mat", "qc_png": root / "qc.png"}


def truth_on_grid(mask: nib.Nifti1Image) -> np.ndarray:
    """The true MNI brain mask on the test grid (linear, > 0.5)."""
    inside = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)
    target = (tuple(GRID["shape"]), grid_affine(GRID["shape"], GRID["spacing"], GRID["origin"]))
    return np.asarray(resample_from_to(inside, target, order=1).dataobj) > 0.5


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def rotation_deg(matrix) -> float:
    """The angle of the rotation part of a rigid 4x4 matrix."""
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def template_brain():
    return load_brain(template_path())


@pytest.fixture(scope="module")
def run(tmp_path_factory, template_brain):
    """One raw head (1.2 x 1.0 x 1.2 mm), preprocessed once with a cache."""
    root = tmp_path_factory.mktemp("preprocess")
    raw = make_raw_head(*template_brain, seed=7)
    source = root / "sub-07_T1w.nii.gz"
    nib.save(raw.image, source)
    record = run_preprocess(FAST, GRID, source, **outputs(root / "out"), cache_dir=root / "cache")
    return SimpleNamespace(raw=raw, source=source, root=root, record=record, outputs=outputs(root / "out"))


def test_the_brain_comes_back_onto_the_mni_grid(run):
    raw, record = run.raw, run.record
    print(f"\nraw head: rotation {rotation_deg(raw.native_from_mni):.1f} deg, shift "
          f"{np.round(raw.native_from_mni[:3, 3], 1)} mm, voxels {raw.image.header.get_zooms()}")
    assert rotation_deg(raw.native_from_mni) > 5 and np.abs(raw.native_from_mni[:3, 3]).max() > 5
    brain, mask = nib.load(run.outputs["brain_out"]), nib.load(run.outputs["mask_out"])
    affine = grid_affine(GRID["shape"], GRID["spacing"], GRID["origin"])
    for image in (brain, mask):
        assert image.shape == tuple(GRID["shape"]) and np.allclose(image.affine, affine)
        assert int(image.header["qform_code"]) == 4 and int(image.header["sform_code"]) == 4
    inside = np.asarray(mask.dataobj) > 0
    found = dice(inside, truth_on_grid(raw.brain_mask))
    print(f"Dice of the recovered mask with the truth (1.2 mm head, 2 mm grid): {found:.4f}; record: "
          f"{json.dumps(record)}")
    assert found >= 0.9
    values = np.asarray(brain.dataobj)
    assert (values[~inside] == 0).all() and (values[inside] > 0).mean() > 0.99  # background exactly 0
    assert record["cache_hits"] == [] and list(record["timings_s"]) == STEPS_WITHOUT_DENOISE
    assert record["template_dice"] > 0.9 and 1500 < record["brain_volume_ml"] < 2300
    assert set(record["versions"]) == {"antspyx", "deepbet", "dipy"}
    assert run.outputs["qc_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_transform_maps_mni_points_to_their_native_places(run):
    """The ANTs forward transform (MNI to native) agrees with the truth within 2 mm inside the brain."""
    import ants

    transform = ants.read_transform(str(run.outputs["transform_out"]))
    points = np.array([[x, y, z] for x in (-50, 0, 50) for y in (-70, 0, 40) for z in (-20, 20, 50)], float)
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    found = np.array([np.asarray(transform.apply_to_point(tuple(p * flip))) * flip for p in points])
    truth = (run.raw.native_from_mni @ np.c_[points, np.ones(len(points))].T)[:3].T
    error = np.linalg.norm(found - truth, axis=1)
    print(f"\ntransform error inside the brain: mean {error.mean():.2f} mm, max {error.max():.2f} mm")
    assert error.max() < 2.0


def test_a_second_call_finds_every_step_in_the_cache_and_changes_nothing(run):
    before = {name: (sha256_file(path), os.stat(path).st_mtime_ns) for name, path in run.outputs.items()}
    record = run_preprocess(FAST, GRID, run.source, **run.outputs, cache_dir=run.root / "cache")
    assert record["cache_hits"] == STEPS_WITHOUT_DENOISE
    assert {name: (sha256_file(path), os.stat(path).st_mtime_ns) for name, path in run.outputs.items()} == before
    assert record["brain_volume_ml"] == run.record["brain_volume_ml"]


def test_a_failed_registration_names_the_input(run, tmp_path):
    """A template overlap below the required one is a failed registration (here required impossibly high);
    the threshold is no part of the registration's cache key, so nothing is registered again."""
    settings = {**FAST, "registration": {**FAST["registration"], "min_template_dice": 0.999}}
    with pytest.raises(BadInputError, match="registration to the MNI template failed") as failure:
        run_preprocess(settings, GRID, run.source, **outputs(tmp_path), cache_dir=run.root / "cache")
    assert failure.value.path == str(run.source) and str(run.source) in str(failure.value)
    assert len(list((run.root / "cache" / "registration").iterdir())) == 1  # the one registration, no temp left
    assert not (tmp_path / "brain.nii.gz").exists()


def test_denoising_on_a_coarse_head(tmp_path, template_brain):
    """Denoising (dipy non-local means) on: a head of 2 mm voxels built from the template at 2 mm."""
    brain, affine = template_brain
    coarse = (tuple(int(s) for s in np.ceil(np.array(brain.shape) / 2)), affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    image = resample_from_to(nib.Nifti1Image(brain, affine), coarse, order=1)
    inside = resample_from_to(nib.Nifti1Image((brain > 0).astype(np.float32), affine), coarse, order=1)
    brain2 = np.asarray(image.dataobj) * (np.asarray(inside.dataobj) > 0.5)
    raw = make_raw_head(brain2.astype(np.float32), image.affine, seed=11, spacing=(2.0, 2.0, 2.0))
    source = tmp_path / "coarse_T1w.nii.gz"
    nib.save(raw.image, source)
    record = run_preprocess({**FAST, "denoise": {"enabled": True}}, GRID, source, **outputs(tmp_path / "out"),
                            cache_dir=None)
    found = dice(np.asarray(nib.load(tmp_path / "out" / "mask.nii.gz").dataobj) > 0, truth_on_grid(raw.brain_mask))
    print(f"\nDice with denoising on (2 mm head, 2 mm grid): {found:.4f}; seconds per step: {record['timings_s']}")
    assert list(record["timings_s"]) == ["denoise", *STEPS_WITHOUT_DENOISE] and found >= 0.9


@pytest.mark.parametrize("content", [b"not a nifti at all", None])
def test_an_unreadable_or_4d_input_is_a_bad_input_error_naming_it(tmp_path, content):
    source = tmp_path / "sub-01_T1w.nii.gz"
    if content is None:
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), source)
    else:
        source.write_bytes(content)
    with pytest.raises(BadInputError, match="4D image" if content is None else "cannot read NIfTI") as failure:
        run_preprocess({}, GRID, source, **outputs(tmp_path / "out"), cache_dir=tmp_path / "cache")
    assert failure.value.path == str(source) and str(source) in str(failure.value)


def test_the_command_reports_a_bad_input_in_one_line(tmp_path, capsys):
    source = tmp_path / "broken_T1w.nii.gz"
    source.write_bytes(b"\x1f\x8b truncated")
    out = outputs(tmp_path / "out")
    code = main(["preprocess", "--config-json", json.dumps({"data": {"grid": GRID}}), "--input", str(source),
                 "--brain", str(out["brain_out"]), "--mask", str(out["mask_out"]),
                 "--transform", str(out["transform_out"]), "--qc-png", str(out["qc_png"])])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and str(source) in error[0] and "Traceback" not in error[0]


def test_settings_fill_defaults_and_refuse_unknown_keys():
    settings = resolve_settings({"registration": {"spacing_mm": 3.0}})
    assert settings["registration"]["spacing_mm"] == 3.0
    assert settings["n4"]["iterations"] == [50, 50, 30, 20] and settings["denoise"]["enabled"] is False
    with pytest.raises(ConfigError, match="preprocess.n4.iteration"):
        resolve_settings({"n4": {"iteration": [10]}})
    with pytest.raises(ConfigError, match="preprocess.registration.type_of_transform"):
        resolve_settings({"registration": {"type_of_transform": "SyN"}})
