import numpy as np
import pytest

from brainddpm.data.manifest import build_manifest, ids_from_path, read_tsv, shard_rows, split_subjects
from brainddpm.data.prepare import run_manifest
from brainddpm.errors import BadInputError, ConfigError
from helpers import base_config, bids_dataset, brain_volume, write_nifti


def test_ids_from_bids_names():
    assert ids_from_path("/d/sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz") == ("sub-01", "ses-2")
    assert ids_from_path("/d/scans/subject_7.nii") == ("sub-subject7", "ses-01")


def test_manifest_rows_and_participants(tmp_path):
    bids_dataset(tmp_path / "a", 3, sessions={1: 2})
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-00\t40\tF\nsub-01\t50\tM\n")
    rows, excluded = build_manifest([{"name": "a", "root": str(tmp_path / "a"),
                                      "participants": str(tmp_path / "participants.tsv")}])
    assert excluded == []
    assert [(r["subject"], r["session"]) for r in rows] == [
        ("sub-00", "ses-1"), ("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", "ses-1")]
    r = rows[0]
    assert r["shape"] == "20x24x20" and r["spacing"] == "1x1x1" and r["orientation"] == "RAS"
    assert len(r["sha256"]) == 64 and r["age"] == "40" and rows[3]["age"] is None


def test_every_bad_input_is_listed_and_the_run_goes_on(tmp_path):
    root = tmp_path / "a"
    good = bids_dataset(root, 2)
    anat = lambda s: root / f"sub-{s}" / "ses-1" / "anat" / f"sub-{s}_ses-1_T1w.nii.gz"  # noqa: E731
    vol = brain_volume(9)
    write_nifti(anat("trunc"), vol)
    anat("trunc").write_bytes(anat("trunc").read_bytes()[:500])
    write_nifti(anat("four"), np.stack([vol, vol], -1))
    nan = vol.copy()
    nan[3, 3, 3] = np.nan
    write_nifti(anat("nan"), nan)
    write_nifti(anat("zero"), np.zeros_like(vol))
    write_nifti(anat("flat"), vol[:, :, 8])
    copy = root / "sub-copy" / "ses-1" / "anat" / "sub-copy_ses-1_T1w.nii.gz"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(good[0].read_bytes())  # two runs of one subject: tests/test_bids.py (a startup error)
    globbed = tmp_path / "g"
    globbed.mkdir()
    (globbed / "readme.txt").write_text("not an image")
    datasets = [{"name": "a", "root": str(root)}, {"name": "g", "glob": str(globbed / "*")}]
    rows, excluded = build_manifest(datasets, jobs=2)
    assert sorted(r["path"] for r in rows) == sorted(map(str, good))
    reasons = {e["path"]: e["reason"] for e in excluded}
    assert "truncated or corrupt" in reasons[str(anat("trunc"))]
    assert "4D" in reasons[str(anat("four"))]
    assert "NaN" in reasons[str(anat("nan"))]
    assert "all voxels are zero" in reasons[str(anat("zero"))]
    assert "2D" in reasons[str(anat("flat"))]
    assert "same file content as" in reasons[str(copy)]
    assert "not a NIfTI" in reasons[str(globbed / "readme.txt")]


def test_a_dataset_that_is_not_there_is_an_error_not_an_exclusion(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    with pytest.raises(ConfigError, match=r"'datasets\[1\] \(gone\).root': .*missing does not exist"):
        build_manifest([{"name": "a", "root": str(tmp_path / "a")},
                        {"name": "gone", "root": str(tmp_path / "missing")}])
    with pytest.raises(ConfigError, match=r"'datasets\[0\] \(g\).glob', .*nothing\*.nii: no file matches"):
        build_manifest([{"name": "g", "glob": str(tmp_path / "nothing*.nii")}])
    (tmp_path / "bad.tsv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInputError, match="bad.tsv: cannot read participants table"):
        build_manifest([{"name": "a", "root": str(tmp_path / "a"), "participants": str(tmp_path / "bad.tsv")}])


def test_a_dataset_without_one_usable_image_stops_the_run_with_the_reasons(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "readme.txt").write_text("not an image")
    cfg = base_config(datasets=[{"name": "a", "root": str(tmp_path / "a")},
                                {"name": "g", "glob": str(tmp_path / "g" / "*")}])
    with pytest.raises(BadInputError, match=r"dataset g has no usable image.*\n.*readme.txt: not a NIfTI"):
        run_manifest(cfg, tmp_path / "m.tsv", tmp_path / "x.tsv")
    assert not (tmp_path / "m.tsv").exists()


def test_a_spreadsheet_export_reads_as_the_same_table(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    plain = "participant_id\tage\tsex\nsub-00\t40\tF\nsub-01\t50\tM\n"
    (tmp_path / "plain.tsv").write_text(plain)
    (tmp_path / "excel.tsv").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode())
    rows = {}
    for name in ("plain", "excel"):
        rows[name], _ = build_manifest([{"name": "a", "root": str(tmp_path / "a"),
                                         "participants": str(tmp_path / f"{name}.tsv")}])
    assert [(r["age"], r["sex"]) for r in rows["excel"]] == [(r["age"], r["sex"]) for r in rows["plain"]] \
        == [("40", "F"), ("50", "M")]


def test_conflicting_rows_for_one_subject_are_refused(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    table = tmp_path / "p.tsv"
    ds = [{"name": "a", "root": str(tmp_path / "a"), "participants": str(table)}]
    age = {"covariates": [{"name": "age", "type": "continuous"}], "drop_prob": 0.1, "missing": "drop"}
    table.write_text("participant_id\tage\tsex\tnote\nsub-00\t40\tF\tx\nsub-00\t40\tF\ty\n")
    rows, _ = build_manifest(ds, condition=age)
    assert rows[0]["age"] == "40"  # rows that agree on the covariates are fine
    table.write_text("participant_id\tage\tsex\nsub-00\t40\tF\nsub-01\t50\tM\nsub-00\t44\tF\n")
    rows, _ = build_manifest(ds)  # a row per visit, no session_id: without conditioning the last row wins
    assert rows[0]["age"] == "44"
    with pytest.raises(BadInputError, match=r"p.tsv: two rows for sub-00 disagree \(age '40' and '44'; the second "
                                            r"at line 4\)"):
        build_manifest(ds, condition=age)


def test_on_bad_input_fail_stops_with_the_same_message(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    zero = tmp_path / "a" / "sub-09" / "ses-1" / "anat" / "sub-09_ses-1_T1w.nii.gz"
    write_nifti(zero, np.zeros((20, 24, 20), np.float32))
    cfg = base_config(datasets=[{"name": "a", "root": str(tmp_path / "a")}], data={"on_bad_input": "fail"})
    with pytest.raises(BadInputError, match="all voxels are zero") as err:
        run_manifest(cfg, tmp_path / "m.tsv", tmp_path / "x.tsv")
    assert str(zero) in str(err.value)
    assert not (tmp_path / "m.tsv").exists()


def _rows(n_subjects, datasets=("a", "b", "c"), sessions=2):
    return [{"subject": f"sub-{s:03d}", "session": f"ses-{k}", "dataset": datasets[s % len(datasets)],
             "path": f"/x/{s}_{k}"} for s in range(n_subjects) for k in range(1 + (s % 3 == 0) * (sessions - 1))]


def test_split_has_no_subject_leakage_and_is_stable():
    rows = _rows(60)
    a = split_subjects(rows, 0.2, seed=7)
    b = split_subjects(list(reversed(rows)), 0.2, seed=7)
    assert a == b
    train = {(r["dataset"], r["subject"]) for r in a if r["split"] == "train"}
    val = {(r["dataset"], r["subject"]) for r in a if r["split"] == "val"}
    assert not train & val and len(val) == 12 and len(train) == 48
    for ds in "abc":  # stratified: 20% of each dataset's subjects
        assert sum(1 for d, _ in val if d == ds) == 4
    c = split_subjects(rows, 0.2, seed=8)
    assert {r["subject"] for r in c if r["split"] == "val"} != {s for _, s in val}


def test_split_longitudinal_first_keeps_one_session():
    rows = _rows(30)
    all_rows = split_subjects(rows, 0.2, seed=1, longitudinal="all")
    first = split_subjects(rows, 0.2, seed=1, longitudinal="first")
    assert len(all_rows) == len(rows) and len(first) == 30
    assert all(r["session"] == "ses-0" for r in first)


def test_adding_a_dataset_does_not_move_other_subjects():
    rows = _rows(30, datasets=("a", "b"))
    more = rows + [{"subject": f"sub-{s}", "session": "ses-0", "dataset": "new", "path": f"/n/{s}"} for s in range(9)]
    before = {(r["dataset"], r["subject"]): r["split"] for r in split_subjects(rows, 0.2, 3)}
    after = {(r["dataset"], r["subject"]): r["split"] for r in split_subjects(more, 0.2, 3)}
    assert all(after[k] == v for k, v in before.items())


def test_shard_rows_cover_split_once():
    rows = split_subjects(_rows(25), 0.2, seed=0)
    shards = shard_rows(rows, "train", 4)
    flat = [r["path"] for s in shards for r in s]
    assert flat == [r["path"] for r in rows if r["split"] == "train"]
    assert all(len(s) == 4 for s in shards[:-1])


def test_manifest_tsv_roundtrip(tmp_path):
    bids_dataset(tmp_path / "a", 2)
    cfg = base_config(datasets=[{"name": "a", "root": str(tmp_path / "a")}])
    run_manifest(cfg, tmp_path / "m.tsv", tmp_path / "x.tsv")
    rows = read_tsv(tmp_path / "m.tsv")
    assert len(rows) == 2 and rows[0]["age"] == "n/a"
    assert read_tsv(tmp_path / "x.tsv") == []
