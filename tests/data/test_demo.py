import nibabel as nib
import numpy as np

from brainddpm.data.demo import GRID_SHAPE, plan_cohort, write_cohort
from brainddpm.data.manifest import read_tsv
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
