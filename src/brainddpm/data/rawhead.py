"""Raw-like native-space T1 heads built from a skull-stripped MNI-space brain, with the truth to check against.

`brainddpm preprocess` (data/preprocess.py) starts where a group's data start: a T1 head as the scanner wrote
it, in the scanner's space. No such image ships with any installed package, so the tests and the `demo-raw`
worked example make their own from a skull-stripped brain in MNI space (nilearn's MNI152 2009a symmetric
template, or a volume of the demo cohort):

1. around the brain, shells by distance from its surface, with a smoothly varying thickness: cerebrospinal
   fluid (dark), skull (dark, with a brighter diploe inside), scalp (bright, as fat is in T1), skin; air
   beyond;
2. a random transform from MNI to "native" world coordinates: rotations up to `max_rotation_deg` about each
   axis, shifts up to `max_shift_mm` along each, and (`max_scale` > 0) a size change per axis, so the head
   lies tilted and off-centre as in a scanner;
3. sampled (trilinear) on a native voxel grid of anisotropic `spacing` (1.2 x 1.0 x 1.2 mm by default), its
   voxel axes stored left-to-right flipped (LAS), as many scanners write them, with the affine that places it
   correctly in native world coordinates;
4. a smooth multiplicative bias field (a random low-order polynomial in the exponent) and Rician noise.

The result is deterministic for a seed. The truth is the brain mask in MNI space (the brain's non-zero voxels
on its own grid) and `native_from_mni`, the 4x4 matrix that maps MNI world millimetres to native ones.
These heads are synthetic: a test of geometry and robustness, not of anatomy (no eyes, no neck).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

# Intensity profile outside the brain, by distance from its surface (mm): T1 values relative to white matter
# (about 0.85 in the template). Piecewise linear, so every tissue edge is about half a millimetre soft.
SHELL_DISTANCE_MM = (0.0, 0.5, 2.5, 3.0, 4.5, 5.0, 6.5, 7.0, 8.5, 9.0, 12.5, 13.0, 14.0, 14.5)
SHELL_INTENSITY = (0.15, 0.15, 0.15, 0.05, 0.05, 0.35, 0.35, 0.05, 0.05, 0.9, 0.9, 0.5, 0.5, 0.0)
PAD_MM = 24.0  # room for the shells around the source grid
BIDS_NAME = re.compile(r"(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")


@dataclass
class RawHead:
    """A raw-like head (`image`, native space) and its truth: the brain mask on the source's MNI grid and
    the matrix from MNI to native world coordinates (mm)."""

    image: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    native_from_mni: np.ndarray
    parameters: dict = field(default_factory=dict)


def load_brain(path) -> tuple[np.ndarray, np.ndarray]:
    """A skull-stripped brain in MNI space (RAS), as float32 scaled so that its 99th percentile is 0.9."""
    from brainddpm.data.nifti import load_checked

    img, data = load_checked(path)
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    brain = np.asarray(ras.dataobj, dtype=np.float32)
    if not (brain > 0).any():
        raise BadInputError(path, "no positive voxels: not a skull-stripped brain")
    return brain * (0.9 / np.percentile(brain[brain > 0], 99)), ras.affine


def polynomial_field(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth random field on a grid: a quadratic polynomial of the normalised coordinates, scaled so that
    its standard deviation is `strength`."""
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = (x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3)
    coefficients = rng.normal(0, 1, size=len(terms))
    values = sum(float(c) * t for c, t in zip(coefficients, terms))
    values = np.broadcast_to(values, shape).astype(np.float32)
    return values * (strength / max(float(values.std()), 1e-6))


def add_shells(brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The brain padded by PAD_MM and surrounded by CSF, skull and scalp shells; returns (head, its affine)."""
    from scipy import ndimage

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    pad = np.ceil(PAD_MM / spacing).astype(int)
    padded = np.pad(brain, [(p, p) for p in pad])
    head_affine = affine.copy()
    head_affine[:3, 3] -= affine[:3, :3] @ pad
    inside = padded > 0
    distance = ndimage.distance_transform_edt(~inside, sampling=spacing).astype(np.float32)
    distance *= 1.0 + polynomial_field(distance.shape, rng, 0.12)  # the shells' thickness varies smoothly
    shells = np.interp(distance, SHELL_DISTANCE_MM, SHELL_INTENSITY).astype(np.float32)
    return np.where(inside, padded, shells), head_affine


def random_native_from_mni(rng: np.random.Generator, max_rotation_deg: float, max_shift_mm: float,
                           max_scale: float = 0.0) -> np.ndarray:
    """A random 4x4 matrix from MNI to native world mm: rotations about the MNI origin (near the anterior
    commissure), a size change per axis of up to `max_scale` (0: rigid), then a shift."""
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, size=3))
    matrix[:3, 3] = rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    return matrix


def native_grid(head: np.ndarray, head_affine: np.ndarray, native_from_mni: np.ndarray, spacing,
                margin_mm: float = 6.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a native voxel grid (LAS: the first axis runs right to left) that covers the head."""
    points = np.argwhere(head > 0.01)[:: 7].astype(np.float64)
    world = (native_from_mni @ head_affine @ np.c_[points, np.ones(len(points))].T)[:3].T
    low, high = world.min(0) - margin_mm, world.max(0) + margin_mm
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing) + 1)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [high[0], low[1], low[2]]
    return shape, affine


def sample_native(head: np.ndarray, head_affine: np.ndarray, native_from_mni: np.ndarray, shape,
                  affine: np.ndarray) -> np.ndarray:
    """The head seen on the native grid: each native voxel takes the (trilinear) MNI-space value it shows."""
    from scipy import ndimage

    voxel_from_native = np.linalg.inv(head_affine) @ np.linalg.inv(native_from_mni) @ affine
    return ndimage.affine_transform(head, voxel_from_native[:3, :3], voxel_from_native[:3, 3], output_shape=shape,
                                    order=1, mode="constant", cval=0.0, output=np.float32)


def make_raw_head(brain: np.ndarray, affine: np.ndarray, seed, spacing=(1.2, 1.0, 1.2), max_rotation_deg=15.0,
                  max_shift_mm=20.0, max_scale=0.0, bias=0.2, noise=0.02) -> RawHead:
    """A raw-like native-space head from a skull-stripped MNI brain (`load_brain`); deterministic for `seed`.

    `bias`: standard deviation of the log bias field (0.2: about -35% to +50% across the head); `noise`: the
    Rician noise's sigma relative to white matter."""
    rng = np.random.default_rng(seed)
    head, head_affine = add_shells(brain, affine, rng)
    native_from_mni = random_native_from_mni(rng, max_rotation_deg, max_shift_mm, max_scale)
    shape, native_affine = native_grid(head, head_affine, native_from_mni, spacing)
    image = sample_native(head, head_affine, native_from_mni, shape, native_affine)
    image *= np.exp(polynomial_field(shape, rng, bias))
    real = image + rng.normal(0, noise, size=shape).astype(np.float32)
    imaginary = rng.normal(0, noise, size=shape).astype(np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    scaled = np.round(np.clip(image, 0, None) * 1000).clip(0, np.iinfo(np.int16).max).astype(np.int16)
    nifti = nib.Nifti1Image(scaled, native_affine)
    nifti.header.set_xyzt_units("mm")
    nifti.set_qform(native_affine, code=1)  # scanner space
    nifti.set_sform(native_affine, code=1)
    nifti.header["descrip"] = b"brain-ddpm synthetic raw head (not a real subject)"
    mask = nib.Nifti1Image((brain > 0).astype(np.uint8), affine)
    mask.set_qform(affine, code=4)
    mask.set_sform(affine, code=4)
    parameters = {"seed": str(seed), "spacing": list(map(float, spacing)), "max_rotation_deg": max_rotation_deg,
                  "max_shift_mm": max_shift_mm, "max_scale": max_scale, "bias": bias, "noise": noise}
    return RawHead(nifti, mask, native_from_mni, parameters)


def find_sources(source) -> list[Path]:
    """The skull-stripped brains to build heads from: NIfTI files below a folder (sorted), or the given paths;
    None: the MNI152 2009a template."""
    from brainddpm.data.preprocess import template_path

    if source is None:
        return [template_path()]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        paths = sorted(p for p in Path(source).rglob("*.nii*") if p.name.endswith((".nii", ".nii.gz")))
        if not paths:
            raise BadInputError(source, "no NIfTI files (.nii, .nii.gz) below this folder")
        return paths
    return [Path(p) for p in ([source] if isinstance(source, (str, Path)) else source)]


def _entities(path: Path, index: int) -> tuple[str, str]:
    """Subject and session of a source file's name (sub-*_ses-*), or numbered ones."""
    found = BIDS_NAME.search(path.name)
    if found is None:
        return f"sub-{index + 1:03d}", "ses-01"
    return found.group(1), found.group(2) or "ses-01"


def write_raw_heads(source, n: int, seed: int, out, participants=None, **options) -> list[Path]:
    """Write `n` raw-like heads as a BIDS folder: out/sub-*/ses-*/anat/sub-*_ses-*_T1w.nii.gz, with the truth
    below out/derivatives/truth/ (the MNI brain mask and native_from_mni as JSON) and participants.tsv (the
    rows of the heads' subjects and sessions, from `participants` or the source folder's participants.tsv).

    Head i comes from source i modulo their number, with seed [seed, i]; a subject and session of the source's
    file name are kept (when n exceeds the sources, a source's second head is its session's run-2, and so on)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    out = Path(out)
    sources = find_sources(source)
    written, cache = [], {}
    for index in range(n):
        path = sources[index % len(sources)]
        subject, session = _entities(path, index % len(sources))
        run = index // len(sources) + 1  # a source's second pass: a second run of its session
        if path not in cache:
            cache = {path: load_brain(path)}  # one source in memory at a time
        head = make_raw_head(*cache[path], seed=[seed, index], **options)
        stem = f"{subject}_{session}" + (f"_run-{run}" if run > 1 else "")
        target = out / subject / session / "anat" / f"{stem}_T1w.nii.gz"
        with atomic_path(target) as tmp:
            nib.save(head.image, tmp)
        truth = out / "derivatives" / "truth" / subject / session / "anat"
        with atomic_path(truth / f"{stem}_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz") as tmp:
            nib.save(head.brain_mask, tmp)
        record = {"source": str(path), "native_from_mni": head.native_from_mni.round(6).tolist(), **head.parameters}
        with atomic_path(truth / f"{stem}_truth.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        written.append(target)
    _write_bids_files(out, written, participants if participants is not None else _participants_beside(source))
    return written


def _participants_beside(source) -> Path | None:
    if isinstance(source, (str, Path)) and Path(source).is_dir() and (Path(source) / "participants.tsv").exists():
        return Path(source) / "participants.tsv"
    return None


def _write_bids_files(out: Path, written: list[Path], participants) -> None:
    """dataset_description.json and (given a source participants.tsv) the rows of the written subjects."""
    description = {"Name": "brain-ddpm synthetic raw heads", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                   "GeneratedBy": [{"Name": "brainddpm raw-heads"}]}
    with atomic_path(out / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(description, indent=1) + "\n")
    if participants is None:
        return
    keys = {tuple(p.name.split("_")[:2]) for p in written}
    subjects = {k[0] for k in keys}
    with open(participants, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header, body = rows[0], rows[1:]
    session = header.index("session_id") if "session_id" in header else None
    kept = [r for r in body if (r[0], r[session]) in keys] if session is not None else \
        [r for r in body if r[0] in subjects]
    with atomic_path(out / "participants.tsv") as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows([header] + kept)
