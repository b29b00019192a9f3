"""Raw-like native heads (data/rawhead.py): anisotropic, tilted and shifted, with the truth that maps them back."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from brainddpm.cli import main
from brainddpm.data.nifti import grid_affine
from brainddpm.data.rawhead import load_brain, make_raw_head, random_native_from_mni, write_raw_heads
from brainddpm.fileio import sha256_file

SHAPE = (60, 72, 60)  # a 2 mm source grid around the MNI origin
AFFINE = grid_affine(SHAPE, (2.0, 2.0, 2.0), (-59.0, -71.0, -59.0))
COARSE = (2.4, 2.0, 2.4)  # native voxels for the tests that need no fine ones


def ellipsoid_brain(seed: int) -> np.ndarray:
    """A brain-sized ellipsoid (radii 60-70 mm) with a texture of slabs, zero outside."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.arange(s) * 2.0 + o for s, o in zip(SHAPE, AFFINE[:3, 3]))
    x, y, z = np.meshgrid(x, y, z, indexing="ij")
    radii = rng.uniform(55, 65, size=3) * np.array([1.0, 1.15, 0.9])
    inside = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 < 1
    return ((0.7 + 0.2 * np.sin(x / 4 + rng.uniform(0, 6))) * inside).astype(np.float32)


def write_source(root):
    """A demo-like folder: two brains under two datasets, and participants.tsv with a third, unused row."""
    for dataset, subject, seed in (("siteA", "sub-001", 0), ("siteB", "sub-002", 1)):
        path = root / dataset / subject / "ses-01" / "anat" / f"{subject}_ses-01_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(ellipsoid_brain(seed), AFFINE), path)
    rows = [["participant_id", "session_id", "dataset", "age"], ["sub-001", "ses-01", "siteA", "30"],
            ["sub-002", "ses-01", "siteB", "40"], ["sub-003", "ses-01", "siteC", "50"]]
    (root / "participants.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return root


def test_a_raw_head_is_native_anisotropic_and_deterministic():
    brain = ellipsoid_brain(0)
    head = make_raw_head(brain, AFFINE, seed=3)
    image = head.image
    assert image.header.get_zooms() == pytest.approx((1.2, 1.0, 1.2))
    assert "".join(nib.aff2axcodes(image.affine)) == "LAS" and int(image.header["sform_code"]) == 1
    assert image.get_data_dtype() == np.int16
    again = make_raw_head(brain, AFFINE, seed=3)
    assert np.array_equal(np.asarray(again.image.dataobj), np.asarray(image.dataobj))
    assert np.array_equal(again.native_from_mni, head.native_from_mni)
    other = make_raw_head(brain, AFFINE, seed=4)
    assert not np.allclose(other.native_from_mni, head.native_from_mni)
    assert np.array_equal(np.asarray(head.brain_mask.dataobj) > 0, brain > 0)


def test_the_truth_maps_the_head_back_onto_the_brain_inside_its_shells():
    """Resampled back to MNI with the truth (by nibabel, not the builder's own code), the head shows the source
    brain's texture inside the brain, a dark skull and a bright scalp around it."""
    brain = ellipsoid_brain(1)
    head = make_raw_head(brain, AFFINE, seed=5, spacing=COARSE)
    data = np.asarray(head.image.dataobj, dtype=np.float32)
    in_mni = nib.Nifti1Image(data, np.linalg.inv(head.native_from_mni) @ head.image.affine)
    back = np.asarray(resample_from_to(in_mni, (SHAPE, AFFINE), order=1).dataobj)
    inside = ndimage.binary_erosion(brain > 0, iterations=2)
    correlation = np.corrcoef(back[inside], brain[inside])[0, 1]
    distance = ndimage.distance_transform_edt(brain == 0, sampling=2.0)
    skull, scalp = back[(distance > 3.5) & (distance < 4.5)], back[(distance > 10) & (distance < 12)]
    print(f"\ncorrelation with the source brain {correlation:.3f}; skull {np.median(skull):.0f}, "
          f"scalp {np.median(scalp):.0f}, brain {np.median(back[inside]):.0f}")
    assert correlation > 0.8
    assert np.median(scalp) > 3 * np.median(skull) and np.median(scalp) > np.median(back[inside])


def test_the_native_transform_stays_within_its_bounds():
    rng = np.random.default_rng(0)
    angles, shifts = [], []
    for _ in range(200):
        matrix = random_native_from_mni(rng, max_rotation_deg=15, max_shift_mm=20)
        rotation = matrix[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1.0)
        angles.append(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
        shifts.append(np.abs(matrix[:3, 3]).max())
    assert max(shifts) <= 20 and max(shifts) > 15
    assert 15 < max(angles) <= 15 * np.sqrt(3)  # three rotations of up to 15 degrees each
    scaled = random_native_from_mni(rng, 15, 20, max_scale=0.05)[:3, :3]
    assert 0.95**3 <= np.linalg.det(scaled) <= 1.05**3


def test_write_raw_heads_writes_a_bids_folder_with_the_truth_and_participants(tmp_path):
    source = write_source(tmp_path / "source")
    paths = write_raw_heads(source, 2, seed=0, out=tmp_path / "raw", spacing=COARSE)
    assert [p.relative_to(tmp_path / "raw").as_posix() for p in paths] == [
        "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz", "sub-002/ses-01/anat/sub-002_ses-01_T1w.nii.gz"]
    with open(tmp_path / "raw" / "participants.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    assert rows == [["participant_id", "session_id", "dataset", "age"], ["sub-001", "ses-01", "siteA", "30"],
                    ["sub-002", "ses-01", "siteB", "40"]]
    truth = tmp_path / "raw" / "derivatives" / "truth" / "sub-002" / "ses-01" / "anat"
    record = json.loads((truth / "sub-002_ses-01_truth.json").read_text())
    assert np.array(record["native_from_mni"]).shape == (4, 4)
    assert record["source"].endswith("sub-002_ses-01_T1w.nii.gz")
    mask = nib.load(truth / "sub-002_ses-01_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj) > 0, ellipsoid_brain(1) > 0)
    assert json.loads((tmp_path / "raw" / "dataset_description.json").read_text())["DatasetType"] == "raw"
    again = write_raw_heads(source, 2, seed=0, out=tmp_path / "again", spacing=COARSE)
    assert [sha256_file(p) for p in again] == [sha256_file(p) for p in paths]


def test_the_raw_heads_command_cycles_through_its_sources(tmp_path):
    source = write_source(tmp_path / "source")
    assert main(["raw-heads", "--from", str(source), "--n", "3", "--seed", "1", "--out", str(tmp_path / "raw")]) == 0
    found = sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").glob("sub-*/*/anat/*"))
    assert found == ["sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz",
                     "sub-001/ses-01/anat/sub-001_ses-01_run-2_T1w.nii.gz",
                     "sub-002/ses-01/anat/sub-002_ses-01_T1w.nii.gz"]
    with open(tmp_path / "raw" / "participants.tsv", newline="") as fh:
        assert len(list(csv.reader(fh, delimiter="\t"))) == 3  # the header and one row per subject and session
    brain, affine = load_brain(source / "siteA" / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_T1w.nii.gz")
    assert np.isclose(np.percentile(brain[brain > 0], 99), 0.9) and np.allclose(affine, AFFINE)
