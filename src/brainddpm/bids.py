"""BIDS file names and the discovery of a dataset's images: which files, which brain masks.

Shared by the data stage's manifest and the workflow's startup checks (startup.py), which run discovery before
any job so that an ambiguous layout (two images for one subject and session, as an fMRIPrep folder has: the
native-space and the MNI-space T1w) is an error at `snakemake -n`, naming the files and the filter that would
choose between them, never a silent pick.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from brainddpm.errors import ConfigError

log = logging.getLogger(__name__)
_SUB = re.compile(r"sub-([A-Za-z0-9]+)")
_SES = re.compile(r"ses-([A-Za-z0-9]+)")


def ids_from_path(path: str) -> tuple[str, str]:
    """Subject and session from BIDS entities in the file name (or its folders); fall back to the stem."""
    name = Path(path).name
    sub = _SUB.search(name) or _SUB.search(path)
    ses = _SES.search(name) or _SES.search(path)
    stem = name.split(".nii")[0]
    return (f"sub-{sub.group(1)}" if sub else f"sub-{re.sub(r'[^A-Za-z0-9]', '', stem)}",
            f"ses-{ses.group(1)}" if ses else "ses-01")


# BIDS entities a dataset's `filters` may select on (the list, and `res`, which fMRIPrep writes for MNI
# outputs at a resolution other than the template's own)
FILTER_ENTITIES = ("ses", "acq", "rec", "run", "space", "res", "desc")
# `layout: fmriprep`: fMRIPrep's MNI-space preprocessed T1w and its sibling brain mask
FMRIPREP_FILTERS = {"space": "MNI152NLin2009cAsym", "desc": "preproc"}
FMRIPREP_MASK = "*_desc-brain_mask.nii*"
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


def bids_entities(path: str) -> dict[str, str]:
    """The key-value entities of a BIDS file name (`sub-01_space-MNI_desc-preproc_T1w.nii.gz` gives sub, space,
    desc), and `ses` from a folder when the name has none."""
    parts = Path(path).name.split(".nii")[0].split("_")
    entities = dict(m.groups() for m in map(_ENTITY.match, parts) if m)
    if "ses" not in entities:
        folder = _SES.search(str(Path(path).parent))
        if folder:
            entities["ses"] = folder.group(1)
    return entities


def dataset_filters(dataset: dict) -> dict[str, str]:
    """The entity filters of a dataset: its layout's (fmriprep), then its own `filters` over them."""
    layout = FMRIPREP_FILTERS if dataset.get("layout") == "fmriprep" else {}
    return {**layout, **(dataset.get("filters") or {})}


def dataset_mask_pattern(dataset: dict) -> str | None:
    """The per-image brain mask pattern of a dataset: its own `mask`, or fMRIPrep's sibling brain mask."""
    if dataset.get("mask"):
        return dataset["mask"]
    return FMRIPREP_MASK if dataset.get("layout") == "fmriprep" else None


def _ambiguity(key: str, subject: str, session: str, paths: list[str], filters: dict) -> ConfigError:
    """The error for two or more images of one subject and session: the files, and the filter that chooses."""
    entities = [bids_entities(p) for p in paths]
    differ = [e for e in FILTER_ENTITIES if len({ents.get(e, "none") for ents in entities}) > 1]
    described = [", ".join(f"{e}: {ents.get(e, 'none')}" for e in differ) or "same entities" for ents in entities]
    files = "; ".join(f"{p} ({what})" for p, what in zip(paths, described))
    given = f" after its filters {filters}" if filters else ""
    if differ:
        e = differ[0]
        value = next((ents[e] for ents in entities if e in ents), None)
        hint = f"choose one with filters: {{{e}: {value}}}"
        if e == "space" or set(differ) & {"space", "desc"}:
            hint += " (for fMRIPrep derivatives: layout: fmriprep)"
    else:
        hint = "their names carry the same entities: keep one of them, or give each a run-<n> entity"
    return ConfigError(f"config key '{key}': {len(paths)} images for {subject} {session}{given}: {files}; {hint}")


def _matches(path: str, filters: dict) -> bool:
    entities = bids_entities(path)
    return all(entities.get(k) == str(v) for k, v in filters.items())


def discover(dataset: dict, index: int = 0) -> list[str]:
    """Image paths of one dataset, chosen by its BIDS entity filters: a ConfigError naming the key when its root
    or glob gives no file, or when two images are left for one subject and session (never a silent pick)."""
    name, key = dataset["name"], f"datasets[{index}] ({dataset['name']})"
    if "root" in dataset:
        root = Path(dataset["root"])
        if not root.is_dir():
            raise ConfigError(f"config key '{key}.root': {root} does not exist")
        paths = sorted(glob.glob(str(root / "sub-*" / "**" / "anat" / "*_T1w.nii*"), recursive=True))
        where = f"{key}.root', no {root}/sub-*/[ses-*/]anat/*_T1w.nii[.gz]"
    else:
        paths = sorted(glob.glob(dataset["glob"], recursive=True))
        where = f"{key}.glob', {dataset['glob']}"
    paths = [p for p in paths if Path(p).is_file() or not Path(p).exists()]
    if not paths:
        raise ConfigError(f"config key '{where}: no file matches")
    filters = dataset_filters(dataset)
    chosen = [p for p in paths if _matches(p, filters)]
    if not chosen:
        raise ConfigError(f"config key '{key}.filters': {filters} leave none of its {len(paths)} images "
                          f"(the first: {paths[0]}, entities {bids_entities(paths[0])})")
    by_image: dict[tuple[str, str], list[str]] = {}
    for p in chosen:
        by_image.setdefault(ids_from_path(p), []).append(p)
    for (subject, session), group in by_image.items():
        if len(group) > 1:
            raise _ambiguity(key, subject, session, group, filters)
    anonymous = sum(1 for p in chosen if not _SUB.search(p))
    if anonymous:
        log.warning("dataset %s: %d files have no sub-<label> in their path; each is taken as its own subject, "
                    "so sessions of one person could land in both splits (use BIDS names)", name, anonymous)
    return chosen


def find_mask(image: str, pattern: str, key: str) -> str:
    """The brain mask of `image`: the file matching `pattern` in the image's folder whose BIDS entities agree
    with the image's (sub, ses, acq, rec, run, and space and res when the image has them); a ConfigError
    naming the image and the pattern when there is none, or more than one."""
    image_entities = bids_entities(image)
    wanted = ("sub", "ses", "acq", "rec", "run", "space", "res")
    found = []
    for candidate in sorted(glob.glob(str(Path(image).parent / pattern))):
        entities = bids_entities(candidate)
        if candidate == image:
            continue
        agree = all(entities[e] == image_entities.get(e) for e in wanted if e in entities)
        same_space = all(entities.get(e) == image_entities[e] for e in ("space", "res") if e in image_entities)
        if agree and same_space:
            found.append(candidate)
    if not found:
        raise ConfigError(f"config key '{key}.mask': no brain mask matching {pattern!r} beside {image} "
                          "(same sub, ses, space and other entities)")
    if len(found) > 1:
        raise ConfigError(f"config key '{key}.mask': {len(found)} masks matching {pattern!r} fit {image}: "
                          f"{', '.join(found)}")
    return found[0]


def image_masks(dataset: dict, paths: list[str], index: int = 0) -> dict[str, str]:
    """path -> its brain mask, for a dataset with a mask pattern (`mask`, or layout fmriprep); {} otherwise."""
    pattern = dataset_mask_pattern(dataset)
    key = f"datasets[{index}] ({dataset['name']})"
    return {p: find_mask(p, pattern, key) for p in paths} if pattern else {}


def reference_mask_path(pattern: str, subject: str, session: str) -> str:
    """A dataset's `reference_mask` pattern for one image: its {subject} and {session} filled in."""
    return pattern.format(subject=subject, session=session)


def reference_masks(dataset: dict, paths: list[str], index: int = 0) -> dict[str, str]:
    """path -> its reference brain mask (`reference_mask`: a path with {subject} and {session}), for a dataset
    that names one; a ConfigError naming the key and the image when a file is missing."""
    pattern = dataset.get("reference_mask")
    if not pattern:
        return {}
    found = {}
    for path in paths:
        reference = reference_mask_path(pattern, *ids_from_path(path))
        if not Path(reference).is_file():
            raise ConfigError(f"config key 'datasets[{index}] ({dataset['name']}).reference_mask': {reference} "
                              f"(for {path}) does not exist")
        found[path] = reference
    return found


# What the preprocess rule writes (BIDS-derivative names): nilearn's template is the ICBM 2009a nonlinear
# symmetric MNI152, BIDS template identifier MNI152NLin2009aSym
PREPROCESSED_SPACE = "MNI152NLin2009aSym"


def preprocessed_paths(folder, dataset: str, subject: str, session: str) -> dict[str, str]:
    """The preprocess rule's outputs for one image: brain, mask, transform (native to MNI) and QC figure."""
    stem = f"{folder}/{dataset}/{subject}/{session}/anat/{subject}_{session}"
    return {"brain": f"{stem}_space-{PREPROCESSED_SPACE}_desc-brain_T1w.nii.gz",
            "mask": f"{stem}_space-{PREPROCESSED_SPACE}_desc-brain_mask.nii.gz",
            "transform": f"{stem}_from-T1w_to-{PREPROCESSED_SPACE}_mode-image_xfm.mat",
            "qc_png": f"{stem}_desc-preprocess_qc.png"}


def preprocessed_dataset(dataset: dict, folder) -> dict:
    """A dataset marked `preprocess: true` as the manifest reads it: the preprocess rule's MNI-space brains and
    their masks below `folder`/<name>, with the dataset's participants table."""
    return {"name": dataset["name"], "root": f"{folder}/{dataset['name']}", "participants": dataset.get("participants"),
            "filters": {"space": PREPROCESSED_SPACE, "desc": "brain"}, "mask": "*_desc-brain_mask.nii.gz",
            **({"reference_mask": dataset["reference_mask"]} if dataset.get("reference_mask") else {})}


def manifest_datasets(datasets: list[dict], preprocessed=None) -> list[dict]:
    """The datasets as the manifest reads them: those to preprocess from the preprocess rule's folder."""
    if any(ds.get("preprocess") for ds in datasets) and preprocessed is None:
        raise ConfigError("datasets with preprocess: true need the preprocess rule's folder (--preprocessed)")
    return [preprocessed_dataset(ds, preprocessed) if ds.get("preprocess") else ds for ds in datasets]


def preprocess_jobs(datasets: list[dict], folder) -> dict[str, str]:
    """The preprocess rule's brain output -> its raw input, for every image of the datasets to preprocess."""
    jobs = {}
    for i, ds in enumerate(datasets):
        if ds.get("preprocess"):
            for path in discover(ds, i):
                subject, session = ids_from_path(path)
                jobs[preprocessed_paths(folder, ds["name"], subject, session)["brain"]] = path
    return jobs
