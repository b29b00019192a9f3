"""Discovery of a dataset's images and masks by BIDS entities (brainddpm.bids): fMRIPrep folders, filters,
per-image masks, and ambiguous layouts that must stop at startup, never pick silently."""

import pytest

from brainddpm.bids import bids_entities, discover, image_masks, manifest_datasets, preprocess_jobs
from brainddpm.data.manifest import build_manifest
from brainddpm.errors import ConfigError
from brainddpm.startup import check_datasets
from helpers import base_config, brain_volume, write_nifti

NATIVE = "sub-01_desc-preproc_T1w.nii.gz"
MNI = "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
MNI_MASK = "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
NATIVE_MASK = "sub-01_desc-brain_mask.nii.gz"


def fmriprep_folder(root, subjects=("01", "02")):
    """An fMRIPrep-like derivatives folder: per subject a native-space head and an MNI-space T1w, each with its
    brain mask (the MNI image on the test grid, the native one on a grid of its own)."""
    for i, sub in enumerate(subjects):
        anat = root / f"sub-{sub}" / "anat"
        vol = brain_volume(i)
        write_nifti(anat / MNI.replace("01", sub, 1), vol)
        write_nifti(anat / MNI_MASK.replace("01", sub, 1), (vol > 0).astype("uint8"))
        write_nifti(anat / NATIVE.replace("01", sub, 1), vol[::-1] + 5.0)  # a head: non-zero everywhere
        write_nifti(anat / NATIVE_MASK.replace("01", sub, 1), (vol[::-1] > 0).astype("uint8"))
    return root


def test_entities_of_a_derivative_name():
    assert bids_entities(f"/d/sub-01/ses-2/anat/{MNI}") == {"sub": "01", "space": "MNI152NLin2009cAsym",
                                                             "desc": "preproc", "ses": "2"}


def test_an_fmriprep_folder_without_a_layout_is_an_error_naming_both_files_and_the_filter(tmp_path):
    root = fmriprep_folder(tmp_path / "fmriprep")
    with pytest.raises(ConfigError) as err:
        discover({"name": "f", "root": str(root)})
    text = str(err.value)
    assert NATIVE in text and MNI in text and "sub-01" in text
    assert "filters: {space: MNI152NLin2009cAsym}" in text and "layout: fmriprep" in text
    with pytest.raises(ConfigError, match="datasets\\[0\\] \\(f\\)"):  # at startup, before any job
        check_datasets(base_config(datasets=[{"name": "f", "root": str(root)}]))


def test_layout_fmriprep_takes_the_mni_image_and_its_own_mask(tmp_path):
    root = fmriprep_folder(tmp_path / "fmriprep")
    dataset = {"name": "f", "root": str(root), "layout": "fmriprep"}
    paths = discover(dataset)
    assert [p.split("/")[-1] for p in paths] == [MNI, MNI.replace("01", "02", 1)]
    masks = image_masks(dataset, paths)
    assert masks[paths[0]].endswith(MNI_MASK) and masks[paths[1]].endswith(MNI_MASK.replace("01", "02", 1))
    rows, excluded = build_manifest([dataset])
    assert excluded == [] and [r["mask"].split("/")[-1] for r in rows] == [MNI_MASK, MNI_MASK.replace("01", "02", 1)]
    check_datasets(base_config(datasets=[dataset]))
    # the same with explicit filters and a mask pattern
    explicit = {"name": "f", "root": str(root), "filters": {"space": "MNI152NLin2009cAsym"},
                "mask": "*_desc-brain_mask.nii.gz"}
    assert discover(explicit) == paths and image_masks(explicit, paths) == masks


def test_a_missing_mask_is_an_error_naming_the_image(tmp_path):
    root = fmriprep_folder(tmp_path / "fmriprep")
    (root / "sub-02" / "anat" / MNI_MASK.replace("01", "02", 1)).unlink()
    dataset = {"name": "f", "root": str(root), "layout": "fmriprep"}
    with pytest.raises(ConfigError, match="no brain mask matching .* beside .*sub-02_space-MNI152NLin2009cAsym"):
        check_datasets(base_config(datasets=[dataset]))


def test_two_runs_need_a_run_filter(tmp_path):
    anat = tmp_path / "bids" / "sub-01" / "ses-1" / "anat"
    write_nifti(anat / "sub-01_ses-1_run-1_T1w.nii.gz", brain_volume(1))
    write_nifti(anat / "sub-01_ses-1_run-2_T1w.nii.gz", brain_volume(2))
    with pytest.raises(ConfigError, match=r"2 images for sub-01 ses-1.*run-1.*run-2.*filters: \{run: 1\}"):
        discover({"name": "b", "root": str(tmp_path / "bids")})
    chosen = discover({"name": "b", "root": str(tmp_path / "bids"), "filters": {"run": "2"}})
    assert [p.split("/")[-1] for p in chosen] == ["sub-01_ses-1_run-2_T1w.nii.gz"]
    with pytest.raises(ConfigError, match="filters.*leave none"):
        discover({"name": "b", "root": str(tmp_path / "bids"), "filters": {"run": "3"}})


def test_datasets_to_preprocess_are_read_from_the_preprocess_folder(tmp_path):
    anat = tmp_path / "raw" / "sub-07" / "anat"
    write_nifti(anat / "sub-07_T1w.nii.gz", brain_volume(7))
    raw = {"name": "r", "root": str(tmp_path / "raw"), "preprocess": True}
    jobs = preprocess_jobs([raw], tmp_path / "pre")
    (brain, source), = jobs.items()
    assert source.endswith("sub-07_T1w.nii.gz")
    assert brain == f"{tmp_path}/pre/r/sub-07/ses-01/anat/sub-07_ses-01_space-MNI152NLin2009aSym_desc-brain_T1w.nii.gz"
    write_nifti(brain, brain_volume(7))
    write_nifti(brain.replace("desc-brain_T1w", "desc-brain_mask"), (brain_volume(7) > 0).astype("uint8"))
    read = manifest_datasets([raw], tmp_path / "pre")
    rows, excluded = build_manifest(read)
    assert excluded == [] and rows[0]["path"] == brain and rows[0]["mask"].endswith("desc-brain_mask.nii.gz")
    with pytest.raises(ConfigError, match="preprocess"):
        manifest_datasets([raw])


def test_a_missing_reference_mask_is_an_error_naming_the_key_and_the_image(tmp_path):
    root = fmriprep_folder(tmp_path / "fmriprep")
    reference = str(tmp_path / "truth" / "{subject}_mask.nii.gz")
    write_nifti(reference.format(subject="sub-01"), (brain_volume(0) > 0).astype("uint8"))
    dataset = {"name": "f", "root": str(root), "layout": "fmriprep", "reference_mask": reference}
    with pytest.raises(ConfigError, match=r"datasets\[0\] \(f\)\.reference_mask': .*sub-02_mask.nii.gz \(for .*sub-02"):
        check_datasets(base_config(datasets=[dataset]))
    write_nifti(reference.format(subject="sub-02"), (brain_volume(1) > 0).astype("uint8"))
    check_datasets(base_config(datasets=[dataset]))
