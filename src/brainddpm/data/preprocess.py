"""Bring a raw native-space T1 head into MNI space as a skull-stripped brain (`brainddpm preprocess`).

The rest of the data stage (nifti.py) expects skull-stripped T1 volumes in MNI space, as the reference study
made them with volBrain/AssemblyNet and ANTs. This module makes them from a raw head, with open tools that
install offline: ANTsPy (N4, registration, resampling), deepbet (brain extraction, its weights inside its
wheel), dipy (non-local means), and the skull-stripped MNI152 2009a (symmetric) template that ships inside
nilearn. Per image, each a function of its own and each cached (below):

1. `denoise` (optional, off by default): dipy's non-local means on the native image, its noise level from
   dipy's `estimate_sigma`;
2. `n4`: ANTs N4 bias correction of the native head, weighted by a head mask (`ants.get_mask`: above the
   image mean), so the air's noise does not steer the field;
3. `brain_extraction`: deepbet on the N4-corrected native head (on the GPU when torch sees one and
   `brain_extraction.gpu` allows, else on the CPU), giving the native brain mask;
4. `registration`: ANTs registration (`registration.type_of_transform`, a linear one; Affine by default) of
   the N4-corrected native *brain* to the template *brain*, both resampled to `registration.spacing_mm`
   (2 mm by default: an affine transform has 12 parameters, which millimetre-scale detail does not improve,
   and the registration takes seconds instead of a minute; null registers at the grid's spacing). Its check
   (outside the cache, so a new threshold registers nothing again): the warped brain mask must overlap the
   template's brain by a Dice of at least `registration.min_template_dice`, else the image is reported as a
   failed registration;
5. `resample`: the N4-corrected head (linear) and the brain mask (linear, then > 0.5) onto the config's
   `data.grid` with the forward transform;
6. `n4_in_mask`: a second N4 pass inside the brain mask on the grid (`n4.second_pass`), and the background set
   to exactly 0 outside the mask;
7. `qc`: a PNG of three orthogonal slices of the result with the template brain's outline.

The order differs from the reference study's, which registered the heads to a head template and extracted the
brain in MNI space: the only template that installs offline (nilearn's) is skull-stripped, and matching a head
to a brain-only template pulls the scalp onto the brain's edge, while brain-to-brain is the robust match. So
the brain is extracted first, in native space, where deepbet sees the head as a scanner wrote it.

Outputs, on `data.grid` (RAS, qform and sform code 4, MNI): the brain (float32, background 0) and the mask
(uint8), the ANTs forward transform (an ITK .mat file) and the QC PNG. The forward transform maps MNI points to
native points; ANTs resamples with it: a native image onto the grid with
`ants.apply_transforms(fixed=grid_image, moving=native_image, transformlist=[transform])`, and a result on the
grid (a mask, a map) back onto the native image with
`ants.apply_transforms(fixed=native_image, moving=result, transformlist=[transform], whichtoinvert=[True])`
(`interpolator="nearestNeighbor"` or "genericLabel" for labels).

Cache: each step's outputs live under `cache_dir/<step>/<key>/`, where the key is the sha256 of the step's
name, the sha256 of each of its input files, the JSON of its settings and the versions of the tools; they are
written to a temporary folder and renamed into place when complete. Calling again with nothing changed redoes
nothing and writes the same bytes (an output that is already identical is left alone). Without a cache folder
the steps run in a temporary one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path, sha256_file

TEMPLATE_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
STEPS = ("denoise", "n4", "brain_extraction", "registration", "resample", "n4_in_mask", "qc")
STEP_CODE_VERSION = 1  # part of every cache key: raise it when a step's code changes what it writes


def template_path() -> Path:
    """The skull-stripped MNI152 2009a (symmetric) T1 template inside the installed nilearn package."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_NAME


def resolve_settings(section: dict | None) -> dict:
    """The `preprocess` settings with every default filled in from the config schema (the one source of the
    defaults; config/README.md); unknown keys and non-linear transforms are a ConfigError naming the key."""
    from brainddpm.config import validate_config

    return validate_config({"preprocess": copy.deepcopy(section or {})}, partial=True)["preprocess"]


def tool_versions() -> dict:
    return {name: metadata.version(name) for name in ("antspyx", "deepbet", "dipy")}


class StepCache:
    """Content-addressed step outputs under `root` (a temporary folder when None); counts hits and times."""

    def __init__(self, root: Path | None):
        self._temporary = tempfile.TemporaryDirectory(prefix="brainddpm-preprocess-") if root is None else None
        self.root = Path(root if root is not None else self._temporary.name)
        self.versions = tool_versions()
        self.hits: list[str] = []
        self.timings: dict[str, float] = {}

    def key(self, step: str, inputs: dict[str, Path], settings) -> str:
        text = json.dumps({"step": step, "code": STEP_CODE_VERSION, "versions": self.versions, "settings": settings,
                           "inputs": {name: sha256_file(path) for name, path in sorted(inputs.items())}},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def run(self, step: str, inputs: dict[str, Path], settings, compute) -> Path:
        """The folder of `step`'s outputs for these inputs and settings: found, or made by
        `compute(inputs, folder)` in a temporary folder that is then renamed into place."""
        start = time.perf_counter()
        folder = self.root / step / self.key(step, inputs, settings)
        if folder.is_dir():
            self.hits.append(step)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=folder.parent))
            try:
                compute(inputs, work)
                try:
                    os.replace(work, folder)
                except OSError:
                    if not folder.is_dir():  # anything but another process having finished the same step
                        raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
        self.timings[step] = round(time.perf_counter() - start, 2)
        return folder

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()


def read_record(folder: Path) -> dict:
    path = folder / "record.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(folder: Path, record: dict) -> None:
    (folder / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def save_like(data: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype=np.float32) -> None:
    """`data` in the space (affine and header) of a native image."""
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, reference.header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, path)


def save_on_grid(data: np.ndarray, grid: dict, path: Path, dtype=np.float32) -> None:
    """`data` on the MNI grid, as nifti.save_volume writes it (qform and sform code 4)."""
    from brainddpm.data.nifti import grid_affine

    affine = grid_affine(grid["shape"], grid["spacing"], grid["origin"])
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    out.header.set_xyzt_units("mm")
    out.set_qform(affine, code=4)
    out.set_sform(affine, code=4)
    nib.save(out, path)


def grid_image(grid: dict, data: np.ndarray | None = None):
    """An ANTs image on the RAS grid (ANTs works in LPS: x and y change sign)."""
    import ants

    origin = np.asarray(grid["origin"], dtype=np.float64)
    data = np.zeros(grid["shape"], dtype=np.float32) if data is None else np.asarray(data, dtype=np.float32)
    return ants.from_numpy(data, origin=(-origin[0], -origin[1], origin[2]),
                           spacing=tuple(map(float, grid["spacing"])), direction=np.diag([-1.0, -1.0, 1.0]))


def denoise(inputs: dict, folder: Path, settings: dict) -> None:
    """Non-local means (dipy) of the native image, its Rician noise level estimated from the background."""
    from dipy.denoise.nlmeans import nlmeans
    from dipy.denoise.noise_estimate import estimate_sigma

    image = nib.load(inputs["image"])
    data = image.get_fdata(dtype=np.float32)
    sigma = float(np.asarray(estimate_sigma(data)).ravel()[0])
    out = nlmeans(data, sigma, patch_radius=settings["patch_radius"], block_radius=settings["block_radius"],
                  rician=settings["rician"]) if sigma > 0 else data
    save_like(out, image, folder / "image.nii.gz")
    write_record(folder, {"sigma": sigma})


def n4(inputs: dict, folder: Path, settings: dict) -> None:
    """N4 bias correction of the native head, weighted by a head mask (the voxels above the image mean)."""
    import ants

    image = ants.image_read(str(inputs["image"]))
    head = ants.get_mask(image, cleanup=0)  # a cleaned mask (cleanup=2) costs more than N4 itself
    corrected = ants.n4_bias_field_correction(
        image, mask=head, shrink_factor=settings["shrink_factor"],
        convergence={"iters": list(settings["iterations"]), "tol": settings["tolerance"]})
    ants.image_write(corrected, str(folder / "image.nii.gz"))


@lru_cache(maxsize=2)
def _extractor(use_gpu: bool):
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not use_gpu)


def brain_extraction(inputs: dict, folder: Path, settings: dict, source: Path) -> None:
    """deepbet's brain mask of the native head (GPU if torch sees one and the settings allow)."""
    import torch

    use_gpu = bool(settings["gpu"]) and torch.cuda.is_available()
    image = nib.load(inputs["image"])
    try:
        _, mask, _ = _extractor(use_gpu).run(image, threshold=settings["threshold"], n_dilate=settings["n_dilate"])
    except (AssertionError, ValueError) as exc:  # deepbet: no foreground for its bounding box, no component
        raise BadInputError(source, f"brain extraction found no brain ({exc or type(exc).__name__})") from None
    data = np.asarray(mask.dataobj, dtype=np.uint8)
    if not data.any():
        raise BadInputError(source, "brain extraction found no brain (empty mask)")
    save_like(data, image, folder / "mask.nii.gz", dtype=np.uint8)
    volume = float(data.sum() * np.prod(image.header.get_zooms()[:3]) / 1000)
    write_record(folder, {"brain_volume_ml": round(volume, 2), "device": "cuda" if use_gpu else "cpu"})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


@contextmanager
def _ants_seed(seed: int):
    """ANTs registration's random sampling seeded (antspy reads it from ants.config), for repeatable results."""
    import ants

    previous = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = previous


@lru_cache(maxsize=2)
def working_template(spacing: float):
    """The template brain (ANTs image) at `spacing` mm and its brain mask (numpy) there."""
    import ants

    template = ants.image_read(str(template_path()))
    if abs(spacing - 1.0) > 1e-6:
        template = ants.resample_image(template, (spacing,) * 3, use_voxels=False, interp_type=0)
    return template, template.numpy() > 5.0  # the template is 0-255, brain voxels well above 5


def registration(inputs: dict, folder: Path, settings: dict, grid: dict, source: Path) -> None:
    """Linear registration of the native brain to the template brain at the working spacing; records the
    overlap (Dice) of the warped brain mask with the template's brain, which `check_registration` judges."""
    import ants

    spacing = float(settings["spacing_mm"] or min(grid["spacing"]))
    image, mask = ants.image_read(str(inputs["image"])), ants.image_read(str(inputs["mask"]))
    moving = ants.resample_image(image * mask, (spacing,) * 3, use_voxels=False, interp_type=0)
    fixed, template_mask = working_template(spacing)
    with _ants_seed(settings["seed"]):
        result = ants.registration(fixed, moving, type_of_transform=settings["type_of_transform"],
                                   outprefix=str(folder / "registration_"))
    transforms = [t for t in result["fwdtransforms"] if str(t).endswith(".mat")]
    if len(transforms) != 1 or len(result["fwdtransforms"]) != 1:
        raise BadInputError(source, f"registration gave {result['fwdtransforms']}, expected one linear transform")
    warped = ants.apply_transforms(fixed, mask, transforms, interpolator="linear").numpy() > 0.5
    overlap = dice(warped, template_mask)
    os.replace(transforms[0], folder / "transform.mat")
    for leftover in folder.glob("registration_*"):
        leftover.unlink()
    write_record(folder, {"template_dice": round(overlap, 4), "spacing_mm": spacing})


def check_registration(record: dict, minimum: float, source: Path) -> None:
    """A brain that overlaps the template's by less than `minimum` (Dice) was registered wrongly. Judged apart
    from the cached registration, so that changing the threshold registers nothing again."""
    if record["template_dice"] < minimum:
        raise BadInputError(source, f"registration to the MNI template failed: the brain overlaps the template's "
                                    f"with a Dice of {record['template_dice']:.2f} (at least {minimum} needed)")


def resample(inputs: dict, folder: Path, grid: dict) -> None:
    """The N4-corrected head (linear) and the brain mask (linear > 0.5) on the MNI grid."""
    import ants

    reference = grid_image(grid)
    transform = [str(inputs["transform"])]
    image = ants.apply_transforms(reference, ants.image_read(str(inputs["image"])), transform, interpolator="linear")
    mask = ants.apply_transforms(reference, ants.image_read(str(inputs["mask"])), transform, interpolator="linear")
    save_on_grid(np.clip(image.numpy(), 0, None), grid, folder / "image.nii.gz")
    save_on_grid(mask.numpy() > 0.5, grid, folder / "mask.nii.gz", dtype=np.uint8)


def n4_in_mask(inputs: dict, folder: Path, settings: dict, grid: dict, source: Path) -> None:
    """The second N4 pass inside the brain mask on the grid (if `second_pass`); exactly 0 outside the mask."""
    import ants

    image = nib.load(inputs["image"]).get_fdata(dtype=np.float32)
    mask = (np.asarray(nib.load(inputs["mask"]).dataobj) > 0) & (image > 0)
    if not mask.any():
        raise BadInputError(source, "the brain mask is empty on the MNI grid (registered outside the grid?)")
    if settings["second_pass"]:
        corrected = ants.n4_bias_field_correction(
            grid_image(grid, image), mask=grid_image(grid, mask.astype(np.float32)),
            shrink_factor=settings["shrink_factor"],
            convergence={"iters": list(settings["iterations"]), "tol": settings["tolerance"]})
        image = corrected.numpy()
    save_on_grid(np.where(mask, np.clip(image, 0, None), 0.0), grid, folder / "brain.nii.gz")
    volume = float(mask.sum() * np.prod(grid["spacing"]) / 1000)
    write_record(folder, {"brain_volume_mni_ml": round(volume, 2)})


def template_on_grid(grid: dict) -> np.ndarray:
    """The template's brain mask on the MNI grid (linear, > 0.5 of the brain's edge)."""
    from nibabel.processing import resample_from_to

    from brainddpm.data.nifti import grid_affine

    template = nib.load(template_path())
    inside = nib.Nifti1Image((np.asarray(template.dataobj) > 5).astype(np.float32), template.affine)
    target = (tuple(grid["shape"]), grid_affine(grid["shape"], grid["spacing"], grid["origin"]))
    return np.asarray(resample_from_to(inside, target, order=1).dataobj) > 0.5


def quality_png(inputs: dict, folder: Path, grid: dict, title: str) -> None:
    """Axial, coronal and sagittal slices through the grid's centre, with the template brain's outline (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    brain = nib.load(inputs["brain"]).get_fdata(dtype=np.float32)
    outline = template_on_grid(grid).astype(np.float32)
    centre = [s // 2 for s in brain.shape]
    top = float(np.percentile(brain[brain > 0], 99.5)) if brain.any() else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for axis, ax, name in zip((2, 1, 0), axes, ("axial", "coronal", "sagittal")):
        cut = [slice(None)] * 3
        cut[axis] = centre[axis]
        ax.imshow(np.rot90(brain[tuple(cut)]), cmap="gray", vmin=0, vmax=top)
        ax.contour(np.rot90(outline[tuple(cut)]), levels=[0.5], colors="red", linewidths=0.7)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{title}: brain on the MNI grid, template brain outline in red", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "qc.png", dpi=90)
    plt.close(fig)


def _place(cached: Path, target: Path) -> None:
    """Copy a cached file to `target` atomically, unless `target` already holds the same bytes."""
    target = Path(target)
    if target.exists() and target.stat().st_size == cached.stat().st_size and \
            sha256_file(target) == sha256_file(cached):
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(cached, tmp)


def _check_source(source: Path) -> None:
    from brainddpm.data.nifti import load_checked

    load_checked(source)  # BadInputError naming the file: missing, unreadable, 4D, empty, NaN


def run_preprocess(settings: dict, grid: dict, source: Path, brain_out: Path, mask_out: Path, transform_out: Path,
                   qc_png: Path, cache_dir: Path | None) -> dict:
    """Preprocess one raw native T1 head into a skull-stripped brain on the MNI `grid` (the module docstring);
    returns a record: seconds per step, the brain volume (ml), the steps found in the cache, tool versions."""
    source = Path(source)
    settings = resolve_settings(settings)
    _check_source(source)
    cache = StepCache(cache_dir)
    try:
        image = source
        if settings["denoise"]["enabled"]:
            step = {k: v for k, v in settings["denoise"].items() if k != "enabled"}
            image = cache.run("denoise", {"image": image}, step,
                              lambda i, f: denoise(i, f, step)) / "image.nii.gz"
        n4_step = {k: v for k, v in settings["n4"].items() if k != "second_pass"}
        corrected = cache.run("n4", {"image": image}, n4_step, lambda i, f: n4(i, f, n4_step)) / "image.nii.gz"
        extracted = cache.run("brain_extraction", {"image": corrected}, settings["brain_extraction"],
                              lambda i, f: brain_extraction(i, f, settings["brain_extraction"], source))
        native = {"image": corrected, "mask": extracted / "mask.nii.gz"}
        registering = {k: v for k, v in settings["registration"].items() if k != "min_template_dice"}
        registered = cache.run("registration", native, {**registering, "grid": grid},
                               lambda i, f: registration(i, f, registering, grid, source))
        check_registration(read_record(registered), settings["registration"]["min_template_dice"], source)
        resampled = cache.run("resample", {**native, "transform": registered / "transform.mat"}, grid,
                              lambda i, f: resample(i, f, grid))
        final = cache.run("n4_in_mask", {"image": resampled / "image.nii.gz", "mask": resampled / "mask.nii.gz"},
                          {**settings["n4"], "grid": grid}, lambda i, f: n4_in_mask(i, f, settings["n4"], grid, source))
        title = source.name.split(".nii")[0]
        quality = cache.run("qc", {"brain": final / "brain.nii.gz"}, {"grid": grid, "title": title},
                            lambda i, f: quality_png(i, f, grid, title))
        for cached, target in ((final / "brain.nii.gz", brain_out), (resampled / "mask.nii.gz", mask_out),
                               (registered / "transform.mat", transform_out), (quality / "qc.png", qc_png)):
            _place(cached, target)
        return {"source": str(source), "timings_s": dict(cache.timings), "cache_hits": list(cache.hits),
                **read_record(extracted), **read_record(registered), **read_record(final),
                "versions": dict(cache.versions)}
    finally:
        cache.close()
