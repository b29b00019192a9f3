"""Read, check and preprocess one T1-weighted NIfTI image.

Inputs are assumed skull-stripped and registered to MNI space (the reference study used
volBrain/AssemblyNet with ANTs; brain-ddpm does not redo that). Per image we:

1. reorient to RAS (nibabel's closest canonical orientation),
2. resample (trilinear) to the configured MNI grid when shape, spacing or position differ,
3. normalise intensities inside the brain mask (the non-zero voxels, or a given mask): the
   `lower_percentile` maps to 0 and the `upper_percentile` to 1, values are clipped to [0, 1]
   and the background is set to exactly 0,
4. resize to the target shape with MONAI's `Resize` (trilinear).

The target grid keeps the field of view of the MNI grid (voxel edges of the first and last voxels
coincide, as in trilinear resizing without aligned corners), so outputs open in the right place in
FSLeyes/ITK-SNAP (`target_affine`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def grid_affine(shape, spacing, origin) -> np.ndarray:
    """RAS affine of a grid with the given spacing whose first voxel centre sits at `origin` (mm)."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = origin
    return aff


def target_affine(data_cfg: dict) -> np.ndarray:
    """Affine of the resized target grid covering the same field of view as the MNI grid."""
    grid = data_cfg["grid"]
    spacing = np.asarray(grid["spacing"], float)
    new_spacing = spacing * np.asarray(grid["shape"]) / np.asarray(data_cfg["target_shape"])
    corner = np.asarray(grid["origin"], float) - spacing / 2  # outer edge of the first voxel
    return grid_affine(data_cfg["target_shape"], new_spacing, corner + new_spacing / 2)


def is_nifti(path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_checked(path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI image and its data, or raise BadInputError naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "file does not exist")
    if not is_nifti(path):
        raise BadInputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise BadInputError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc}); truncated or corrupt?") from None
    shape = data.shape
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    elif data.ndim == 4:
        raise BadInputError(path, f"4D image with {shape[3]} volumes; expected one 3D T1 volume")
    if data.ndim != 3:
        raise BadInputError(path, f"{data.ndim}D image of shape {shape}; expected a 3D volume")
    if min(data.shape) < 2:
        raise BadInputError(path, f"image of shape {shape} is 2D (a single slice); expected a 3D volume")
    if not np.isfinite(data).all():
        raise BadInputError(path, f"{int((~np.isfinite(data)).sum())} voxels are NaN or Inf")
    if not data.any():
        raise BadInputError(path, "all voxels are zero")
    return img, data


def header_info(img: nib.Nifti1Image) -> dict:
    return {
        "shape": "x".join(map(str, img.shape[:3])),
        "spacing": "x".join(f"{z:g}" for z in img.header.get_zooms()[:3]),
        "orientation": "".join(nib.aff2axcodes(img.affine)),
    }


def to_grid(img: nib.Nifti1Image, data: np.ndarray, data_cfg: dict) -> np.ndarray:
    """Reorient to RAS and resample onto the configured MNI grid if the image is not already on it."""
    grid = data_cfg["grid"]
    affine = grid_affine(grid["shape"], grid["spacing"], grid["origin"])
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    if tuple(ras.shape) == tuple(grid["shape"]) and np.allclose(ras.affine, affine, atol=1e-3):
        return np.asarray(ras.dataobj, dtype=np.float32)
    from nibabel.processing import resample_from_to

    out = resample_from_to(ras, (tuple(grid["shape"]), affine), order=1, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


def normalize(vol: np.ndarray, mask: np.ndarray, lower: float, upper: float) -> tuple[np.ndarray, dict]:
    """Map the [lower, upper] percentiles inside `mask` to [0, 1], clip, zero the background."""
    inside = vol[mask]
    lo, hi = np.percentile(inside, [lower, upper])
    if hi <= lo:
        raise ValueError("no intensity contrast inside the brain mask")
    out = np.clip((vol - lo) / (hi - lo), 0.0, 1.0)
    out[~mask] = 0.0
    return out.astype(np.float32), {"p_low": float(lo), "p_high": float(hi), "mask_voxels": int(mask.sum())}


def resize(vol: np.ndarray, target_shape) -> np.ndarray:
    from monai.transforms import Resize

    out = Resize(spatial_size=tuple(target_shape), mode="trilinear")(vol[None])
    return np.asarray(out[0], dtype=np.float32)


def preprocess(path, data_cfg: dict, mask: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Load, check and preprocess one image to a (D, H, W) float32 array in [0, 1] on the target grid."""
    img, data = load_checked(path)
    vol = to_grid(img, data, data_cfg)
    brain = (vol > 0) if mask is None else mask
    if not brain.any():
        raise BadInputError(path, "no brain voxels inside the grid after resampling (wrong space?)")
    try:
        vol, stats = normalize(vol, brain, data_cfg["intensity"]["lower_percentile"],
                               data_cfg["intensity"]["upper_percentile"])
    except ValueError as exc:
        raise BadInputError(path, str(exc)) from None
    out = resize(vol, data_cfg["target_shape"])
    stats.update(mean=float(out[out > 0].mean()) if out.any() else 0.0, max=float(out.max()))
    return out, stats


def load_mask(path, data_cfg: dict) -> np.ndarray:
    """A provided brain mask, brought onto the MNI grid (nearest neighbour is enough at >0.5)."""
    img, data = load_checked(path)
    return to_grid(img, (data > 0).astype(np.float32), data_cfg) > 0.5


def save_volume(vol: np.ndarray, affine: np.ndarray, path, dtype=np.float32) -> None:
    """Write a NIfTI (float32, or `dtype`: uint8 for a mask) atomically (temp name, then rename)."""
    img = nib.Nifti1Image(np.asarray(vol, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=4)  # MNI152 space
    img.set_sform(affine, code=4)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
