import nibabel as nib
import numpy as np
import pytest

from brainddpm.data.demo import GRID_SHAPE, plan_cohort, write_cohort
from brainddpm.data.manifest import read_tsv
from brainddpm.errors import ConfigError
from brainddpm.fileio import sha256_file


def test_plan_has_several_datasets_and_longitudinal_subjects():
    plan = plan_cohort(32, seed=0)
    assert len(plan) == 32
    assert {r["dataset"] for r in plan} == {"siteA", "siteB", "siteC"}
    per_subject = {}
    for r in plan:
        per_subject.setdefault(r["subject"], []).append(r)
    longitudinal = [rows for rows in per_subject.values() if len(rows) == 2]
    assert longitudinal and all(len({r["dataset"] for r in rows}) == 1 for rows in longitudinal)
    assert all(rows[1]["age"] > rows[0]["age"] for rows in longitudinal)
    assert plan_cohort(32, seed=0) == plan and plan_cohort(32, seed=1) != plan


def test_cohort_is_deterministic_brain_like_and_on_the_mni_grid(tmp_path):
    a = write_cohort(3, seed=5, out=tmp_path / "a", progress=False)
    b = write_cohort(3, seed=5, out=tmp_path / "b", progress=False)
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]
    img = nib.load(a[0])
    assert img.shape == GRID_SHAPE and "".join(nib.aff2axcodes(img.affine)) == "RAS"
    np.testing.assert_allclose(img.affine[:3, 3], [-90, -126, -72])
    vol = np.asarray(img.dataobj, dtype=np.float32)
    brain = vol > 0
    assert 0.1 < brain.mean() < 0.35  # a skull-stripped brain fills part of the box
    assert not brain[0].any() and not brain[:, :, -1].any()  # zero background at the edges
    # grey matter darker than white matter: the template's tissue contrast survives
    rows = read_tsv(tmp_path / "a" / "participants.tsv")
    assert [r["synthetic"] for r in rows] == ["yes"] * 3
    other = np.asarray(nib.load(a[1]).dataobj, dtype=np.float32)
    assert np.corrcoef(vol.ravel(), other.ravel())[0, 1] < 0.999  # subjects differ


# The default cohort as the code wrote it before the diagnosis option existed: sha256 of each volume's
# int16 voxels (seed 5, three volumes) and of participants.tsv.
DEFAULT_COHORT = {
    "siteA/sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz":
        "93cf4becf0e0afec2a5f388f08443beb4003cfcf2e96115113a13dd4578718d6",
    "siteB/sub-002/ses-01/anat/sub-002_ses-01_T1w.nii.gz":
        "6769a2e243c21e728cd2c93c8fe12b8479ef4bb8e2d9fc4a492e4c5c4a379ff2",
    "siteC/sub-003/ses-01/anat/sub-003_ses-01_T1w.nii.gz":
        "83003b6c9e3742709a7c542efba06f36b8042fba8c047845097144f275abc3e4",
    "participants.tsv": "519dcfdd56cf752f9058e7b50bef607e612791d0cee35d0b5398e15bf976c0eb",
}


def test_default_cohort_is_byte_identical_to_before_the_diagnosis_option(tmp_path):
    import hashlib

    paths = write_cohort(3, seed=5, out=tmp_path, progress=False)
    found = {str(p.relative_to(tmp_path)): hashlib.sha256(np.ascontiguousarray(nib.load(p).dataobj).tobytes())
             .hexdigest() for p in paths}
    found["participants.tsv"] = sha256_file(tmp_path / "participants.tsv")
    assert found == DEFAULT_COHORT


def test_patient_fraction_adds_a_diagnosis_and_changes_nothing_else_in_the_plan():
    plain = plan_cohort(60, seed=2)
    plan = plan_cohort(60, seed=2, patient_fraction=0.2)
    assert [{k: v for k, v in r.items() if k not in ("diagnosis", "severity")} for r in plan] == plain
    by_subject = {}
    for r in plan:
        by_subject.setdefault(r["subject"], set()).add((r["diagnosis"], r["severity"]))
    assert all(len(v) == 1 for v in by_subject.values())  # the sessions of a subject agree
    diagnoses = [next(iter(v))[0] for v in by_subject.values()]
    assert diagnoses.count("patient") == round(0.2 * len(by_subject))
    assert all(0.5 <= s <= 1 for d, s in (next(iter(v)) for v in by_subject.values()) if d == "patient")
    with pytest.raises(ConfigError, match="patient fraction"):
        plan_cohort(10, seed=0, patient_fraction=1.5)


def test_the_patient_signature_is_resolved_at_the_demo_grid():
    """Frontal/temporal atrophy and wider ventricles change many voxels of the 24x32x24 grid: the brain
    loses frontal voxels and gains dark ventricle voxels."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    from brainddpm.data import demo

    t = demo.load_templates()
    ventricles = demo._ventricle_mask(t)
    csf = float(np.median(t["t1"][ventricles]))
    grown = demo.enlarge_ventricles(t, ndimage.distance_transform_edt(~ventricles), csf,
                                    demo.PATIENT_VENTRICLE_MM * 0.5)
    patient = demo.atrophy_cortex(grown, ndimage.distance_transform_edt(t["t1"] > 0.02),
                                  demo.PATIENT_ATROPHY_MM * 0.5 * demo._frontotemporal_weight())

    def demo_grid(x):
        return F.interpolate(torch.from_numpy(x)[None, None], size=(24, 32, 24), mode="area")[0, 0].numpy()

    control, ill = demo_grid(t["t1"]), demo_grid(patient["t1"])
    changed = np.abs(control - ill) > 0.1 * control.max()
    assert changed.sum() > 100  # the mildest patient (severity 0.5) still changes a hundred voxels
    front, back = changed[:, 18:].sum(), changed[:, :10].sum()  # anterior (frontal) vs posterior (occipital)
    assert front > 3 * max(back, 1)
    assert (ill < control - 0.1).sum() > 100  # darker: ventricles and lost cortex


def test_cohort_with_patients_writes_the_diagnosis_column(tmp_path):
    write_cohort(2, seed=0, out=tmp_path, progress=False, patient_fraction=0.5)  # two subjects
    header = (tmp_path / "participants.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["participant_id", "session_id", "dataset", "age", "sex", "diagnosis", "synthetic"]
    assert [r["diagnosis"] for r in read_tsv(tmp_path / "participants.tsv")] == ["control", "patient"]
