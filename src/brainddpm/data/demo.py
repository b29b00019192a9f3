"""Synthetic demo cohort: skull-stripped T1 volumes on the MNI 1 mm grid (181x217x181).

Every subject is derived from the MNI152 2009 template and its grey/white-matter maps that ship
inside the nilearn package (read from the installed package, nothing is downloaded). Each subject
gets a global size scaling, a random smooth deformation, a local magnification around the
ventricles' centre that grows with age ("atrophy"), tissue-contrast jitter, a smooth multiplicative
bias field and noise. A few subjects have a second session two years later. The cohort is
deterministic for a seed.

The age-dependent magnification is subtle: at the demo's 24x32x24 grid it is below what a 7 mm voxel
resolves. `ventricle_growth_mm` (0 by default, which leaves the cohort as it always was) adds an
unmistakable age effect for the conditioning demo: the lateral ventricles (template CSF deep inside
the brain) grow by that many millimetres between age 20 and 85, linearly, in every direction.

`patient_fraction` (0 by default, which again leaves the cohort as it was) adds a `diagnosis` column for
the utility demo: that fraction of the subjects (drawn from a random stream of its own, so ages, sexes
and anatomies stay those of the default cohort) are "patient", the rest "control". A patient carries a
morphological signature that the 24x32x24 demo grid resolves, scaled by a per-patient severity in
[0.5, 1]: frontal and temporal cortex lost from the surface inwards (up to `PATIENT_ATROPHY_MM`, 8 mm) and
lateral ventricles widened on every side (up to `PATIENT_VENTRICLE_MM`, 5 mm, so 10 mm across): hundreds of
the demo's 7 mm voxels change.

These volumes are synthetic: they exist to exercise the pipeline, not to train a useful model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from brainddpm.data.nifti import grid_affine
from brainddpm.errors import ConfigError
from brainddpm.fileio import atomic_path

_TEMPLATE_DIR = "datasets/data"
_TEMPLATES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
GRID_SHAPE = (181, 217, 181)
GRID_ORIGIN = (-90.0, -126.0, -72.0)
DATASETS = ("siteA", "siteB", "siteC")
PATIENT_ATROPHY_MM = 8.0  # frontal/temporal cortex lost by the most severe patient (depth from the surface)
PATIENT_VENTRICLE_MM = 5.0  # lateral ventricle widening of the most severe patient


def load_templates() -> dict[str, np.ndarray]:
    """The nilearn MNI152 2009 templates resampled (by cropping: same 1 mm lattice) to the 181x217x181 grid."""
    import nilearn

    root = Path(nilearn.__file__).parent / _TEMPLATE_DIR
    target = grid_affine(GRID_SHAPE, (1.0, 1.0, 1.0), GRID_ORIGIN)
    out = {}
    for key, name in _TEMPLATES.items():
        img = nib.as_closest_canonical(nib.load(root / name))
        offset = np.linalg.solve(img.affine, target[:, 3])[:3].round().astype(int)
        if not np.allclose(img.affine[:3, :3], np.eye(3)) or (offset < 0).any():
            raise RuntimeError(f"unexpected template grid in {root / name}")
        sl = tuple(slice(o, o + s) for o, s in zip(offset, GRID_SHAPE))
        out[key] = np.asarray(img.dataobj[sl], dtype=np.float32) / 255.0
    return out


def _smooth_field(rng: np.random.Generator, channels: int, coarse: tuple[int, int, int], amplitude: float):
    """A random field that is smooth at the scale of the brain: coarse noise, trilinearly upsampled."""
    noise = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(noise, size=GRID_SHAPE, mode="trilinear", align_corners=True)[0] * amplitude


def _identity_grid() -> torch.Tensor:
    axes = [torch.linspace(-1, 1, s) for s in GRID_SHAPE]
    z, y, x = torch.meshgrid(*axes, indexing="ij")  # array axes (i, j, k)
    return torch.stack([x, y, z], dim=-1)  # grid_sample wants (x=k, y=j, z=i)


def _subject_warp(rng: np.random.Generator, ventricles: np.ndarray, atrophy: float) -> torch.Tensor:
    """Sampling grid (1, D, H, W, 3) in grid_sample's normalised coordinates."""
    grid = _identity_grid()
    half = torch.tensor([(s - 1) / 2 for s in GRID_SHAPE[::-1]])  # voxels per unit, (k, j, i) order
    scale = 1.0 / rng.uniform(0.92, 1.08)  # sampling the template at scaled coords = brain size change
    disp = _smooth_field(rng, 3, (5, 6, 5), 2.5).permute(1, 2, 3, 0).flip(-1) / half  # ~2.5 mm
    # Ventricle enlargement: pull samples towards the ventricle centre, strongest near it.
    centre_vox = np.argwhere(ventricles).mean(axis=0)
    centre = torch.tensor((centre_vox / (np.array(GRID_SHAPE) - 1)) * 2 - 1, dtype=torch.float32).flip(0)
    rel = grid - centre
    r2 = ((rel * half) ** 2).sum(-1, keepdim=True)
    pull = atrophy * torch.exp(-r2 / (2 * 18.0**2))
    return ((grid - centre) * scale * (1 - pull) + centre + disp).unsqueeze(0)


def enlarge_ventricles(templates: dict, distance: np.ndarray, csf: float, grow_mm: float) -> dict:
    """Templates whose ventricles reach `grow_mm` further: voxels that close to them take the T1 value `csf`.

    `distance` is the distance (mm) of each voxel to the ventricle mask; the edge is one voxel soft.
    """
    if grow_mm <= 0:
        return templates
    inside = templates["t1"] > 0.02
    m = (np.clip(grow_mm + 0.5 - distance, 0.0, 1.0) * inside).astype(np.float32)
    return {"t1": templates["t1"] * (1 - m) + csf * m, "gm": templates["gm"] * (1 - m), "wm": templates["wm"] * (1 - m)}


def _frontotemporal_weight() -> np.ndarray:
    """Where a patient's cortex thins, in [0, 1] on the grid: the frontal lobes (MNI y above about 0 mm)
    and the temporal lobes (lateral, below the Sylvian fissure), with soft edges of a few mm."""
    def ramp(v, edge, width):
        return 1.0 / (1.0 + np.exp(-(v - edge) / width))

    x, y, z = (np.arange(s, dtype=np.float32) + o for s, o in zip(GRID_SHAPE, GRID_ORIGIN))
    x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    frontal = ramp(y, 0.0, 5.0)
    temporal = ramp(np.abs(x), 32.0, 4.0) * ramp(-z, 5.0, 4.0) * ramp(y, -60.0, 6.0)
    return np.maximum(frontal, temporal).astype(np.float32)


def atrophy_cortex(templates: dict, depth: np.ndarray, loss_mm: np.ndarray) -> dict:
    """Templates whose brain surface retreats by `loss_mm` (per voxel): voxels less deep than that become
    background, as skull-stripped atrophy shows. `depth` is each voxel's distance (mm) to outside the brain;
    the edge is one voxel soft."""
    keep = np.clip(depth - loss_mm + 0.5, 0.0, 1.0).astype(np.float32)
    return {key: value * keep for key, value in templates.items()}


def make_subject(templates: dict, ventricles: np.ndarray, rng: np.random.Generator, atrophy: float,
                 anatomy_seed: int) -> np.ndarray:
    """One synthetic skull-stripped T1 volume (float32, background exactly 0)."""
    anat = np.random.default_rng(anatomy_seed)  # anatomy is shared by the sessions of a subject
    grid = _subject_warp(anat, ventricles, atrophy)
    stack = torch.from_numpy(np.stack([templates["t1"], templates["gm"], templates["wm"]]))[None]
    t1, gm, wm = F.grid_sample(stack, grid, mode="bilinear", align_corners=True)[0].numpy()
    mask = t1 > 0.02
    contrast = 1 + rng.normal(0, 0.04) * wm - rng.normal(0.03, 0.03) * gm
    bias = np.exp(_smooth_field(rng, 1, (3, 3, 3), 0.08)[0].numpy())
    img = t1 * contrast * bias * rng.uniform(0.8, 1.2)
    img = img + rng.normal(0, 0.015, size=img.shape).astype(np.float32)
    img = np.clip(img, 0, None) * mask
    return img.astype(np.float32)


def _ventricle_mask(templates: dict) -> np.ndarray:
    """Voxels inside the brain that are neither grey nor white matter and far from the cortex."""
    from scipy import ndimage

    brain = templates["t1"] > 0.02
    csf = brain & (templates["gm"] < 0.2) & (templates["wm"] < 0.2)
    depth = ndimage.distance_transform_edt(brain)
    return csf & (depth > 20)


def plan_cohort(n: int, seed: int, patient_fraction: float = 0.0) -> list[dict]:
    """Subjects and sessions for n volumes: ~20% of subjects have two sessions; datasets round-robin.

    `patient_fraction` > 0: that fraction of the subjects (rounded, at least one) gets diagnosis "patient"
    with a severity in [0.5, 1], the others "control"; drawn from a stream of its own, so that every other
    column is the same as without it."""
    rng = np.random.default_rng(seed)
    rows, subject = [], 0
    while len(rows) < n:
        subject += 1
        sessions = 2 if (rng.random() < 0.25 and n - len(rows) >= 2) else 1
        age = float(rng.uniform(20, 85))
        sex = str(rng.choice(["F", "M"]))
        anatomy_seed = int(rng.integers(2**31))
        for s in range(sessions):
            rows.append({
                "subject": f"sub-{subject:03d}", "session": f"ses-{s + 1:02d}",
                "dataset": DATASETS[(subject - 1) % len(DATASETS)],
                "age": round(age + 2 * s, 1), "sex": sex, "anatomy_seed": anatomy_seed,
            })
    if patient_fraction > 0:
        _assign_diagnosis(rows, seed, patient_fraction)
    return rows


def _assign_diagnosis(rows: list[dict], seed: int, patient_fraction: float) -> None:
    """Add diagnosis and severity to the rows of a plan, per subject (the sessions of a subject agree)."""
    if not 0 < patient_fraction < 1:
        raise ConfigError(f"demo patient fraction must lie between 0 and 1, not {patient_fraction}")
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    rng = np.random.default_rng([seed, 20])  # a stream of its own: the default columns stay as they were
    count = max(1, round(patient_fraction * len(subjects)))
    patients = {subjects[i]: float(rng.uniform(0.5, 1.0))
                for i in sorted(rng.choice(len(subjects), size=count, replace=False))}
    for r in rows:
        r["diagnosis"] = "patient" if r["subject"] in patients else "control"
        r["severity"] = round(patients.get(r["subject"], 0.0), 3)


def write_cohort(n: int, seed: int, out: Path, mosaic: Path | None = None, progress: bool = True,
                 ventricle_growth_mm: float = 0.0, patient_fraction: float = 0.0) -> list[Path]:
    """Write the cohort below `out` as {dataset}/sub-*/ses-*/anat/sub-*_ses-*_T1w.nii.gz + participants.tsv.

    `patient_fraction` > 0 adds the diagnosis column and the patients' signature (module docstring)."""
    from scipy import ndimage
    from tqdm import tqdm

    out = Path(out)
    templates = load_templates()
    ventricles = _ventricle_mask(templates)
    patients = patient_fraction > 0
    distance = ndimage.distance_transform_edt(~ventricles) if ventricle_growth_mm > 0 or patients else None
    depth = ndimage.distance_transform_edt(templates["t1"] > 0.02) if patients else None
    weight = _frontotemporal_weight() if patients else None
    csf = float(np.median(templates["t1"][ventricles]))  # the ventricles' own T1 value, for enlarge_ventricles
    affine = grid_affine(GRID_SHAPE, (1.0, 1.0, 1.0), GRID_ORIGIN)
    plan = plan_cohort(n, seed, patient_fraction)
    paths = []
    for i, row in enumerate(tqdm(plan, desc="demo cohort", unit="vol", disable=not progress)):
        rng = np.random.default_rng([seed, i])
        atrophy = 0.1 + 0.35 * (row["age"] - 20) / 65  # ventricles grow with age
        severity = row.get("severity", 0.0)
        grow_mm = ventricle_growth_mm * (row["age"] - 20) / 65 + PATIENT_VENTRICLE_MM * severity
        grown = enlarge_ventricles(templates, distance, csf, grow_mm) if distance is not None else templates
        if severity > 0:
            grown = atrophy_cortex(grown, depth, PATIENT_ATROPHY_MM * severity * weight)
        img = make_subject(grown, ventricles, rng, atrophy, row["anatomy_seed"])
        scaled = np.round(img / max(img.max(), 1e-6) * 1000).astype(np.int16)
        nii = nib.Nifti1Image(scaled, affine)
        nii.header.set_xyzt_units("mm")
        nii.header["descrip"] = b"brain-ddpm synthetic demo T1w (not a real subject)"
        sub, ses = row["subject"], row["session"]
        path = out / row["dataset"] / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.nii.gz")
        nib.save(nii, tmp)
        tmp.replace(path)
        paths.append(path)
    _write_participants(plan, out / "participants.tsv")
    if mosaic is not None:
        write_mosaic(paths[:6], mosaic)
    return paths


def _write_participants(plan: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tsv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        diagnosis = any("diagnosis" in r for r in plan)  # the column exists only when asked for
        w.writerow(["participant_id", "session_id", "dataset", "age", "sex"] + ["diagnosis"] * diagnosis
                   + ["synthetic"])
        for r in plan:
            w.writerow([r["subject"], r["session"], r["dataset"], r["age"], r["sex"]]
                       + [r.get("diagnosis")] * diagnosis + ["yes"])
    tmp.replace(path)


def write_mosaic(paths: list[Path], png: Path) -> None:
    """Axial, coronal and sagittal mid-slices of a few volumes, one row per volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(paths), 3, figsize=(7.5, 2.6 * len(paths)), squeeze=False)
    for row, path in zip(axes, paths):
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        cx, cy, cz = (s // 2 for s in vol.shape)
        for ax, sl, name in zip(row, (vol[:, :, cz], vol[:, cy, :], vol[cx, :, :]), ("axial", "coronal", "sagittal")):
            ax.imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=np.percentile(vol[vol > 0], 99.5))
            ax.set_axis_off()
            ax.set_title(f"{Path(path).name.split('_T1w')[0]} {name}", fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
