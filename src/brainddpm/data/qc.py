"""Input QC: is each image a skull-stripped brain on the MNI grid, and what did the data stage leave out?

Every image of the manifest is brought onto the configured grid (as the shards will bring it: RAS, trilinear
resampling when off the grid, `nifti.to_grid`) and compared with the brain mask of the MNI152 2009 template that
ships inside nilearn (nothing is downloaded). Checks, one number each in qc.tsv:

- `dice_template`: Dice of the image's brain (its own mask, or its non-zero voxels) with the template's brain.
  An image in native space, or badly registered, overlaps little.
- `border_fraction`: the fraction of its brain within two voxels of the grid's faces. A shifted or cropped
  image puts brain on the border of the field of view; a brain on the grid has only the brainstem's end there.
- `outside_template`: the fraction of its brain farther than `qc.outside_mm` outside the template's brain:
  scalp or skull left in an image that should be skull-stripped (or a registration gone wrong).
- `normalized_mean`: the mean inside the template brain after the shards' percentile normalisation. Bright
  scalp sets the upper percentile, so a head with its skull has a dark brain (0.46 against 0.69).
- `brain_volume_ml` and `normalized_mean` as robust z-scores (median and MAD) within the image's dataset.
- orientation and voxel size as found (from the manifest).
- `dice_reference`: for a dataset with a `reference_mask` (a known brain mask per image: a manual
  segmentation, or the truth that `brainddpm raw-heads` writes), Dice of the image's brain with it on the grid:
  how well preprocessing recovered the brain. Reported, never a flag.

`data.qc.policy` says what a flagged image does: `warn` (it trains; counted on the console and in the report),
`exclude` (left out before the split, counted), `fail` (the run stops, naming every flagged image).

`data_summary.json` counts, per dataset, the images found, in and out with their reasons (the manifest's
exclusions and QC's), the covariates missing or unreadable, and participants-table rows that match no image
(with a hint when IDs differ only in zero padding, `sub-1` against `sub-01`). The workflow prints it at the end
of the run and the report's "Data" section shows it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from brainddpm.data.covariates import MISSING
from brainddpm.data.manifest import read_participants, read_tsv, write_tsv
from brainddpm.data.nifti import grid_affine, load_checked, normalize, to_grid
from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

QC_COLUMNS = ["path", "dataset", "subject", "session", "orientation", "spacing", "dice_template", "border_fraction",
              "outside_template", "brain_volume_ml", "normalized_mean", "volume_z", "mean_z", "dice_reference",
              "flags", "decision"]
TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
BORDER_VOXELS = 2

log = logging.getLogger(__name__)


def _grid_key(grid: dict) -> tuple:
    return tuple(grid["shape"]), tuple(map(float, grid["spacing"])), tuple(map(float, grid["origin"]))


@functools.lru_cache(maxsize=4)
def template_masks(grid_key: tuple, outside_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The template's brain on the grid, and the region farther than `outside_mm` outside it (bool arrays)."""
    import nibabel as nib
    import nilearn
    from nibabel.processing import resample_from_to
    from scipy import ndimage

    shape, spacing, origin = grid_key
    img = nib.as_closest_canonical(nib.load(Path(nilearn.__file__).parent / TEMPLATE))
    data = np.asarray(img.dataobj, dtype=np.float32)
    brain = nib.Nifti1Image((data > 0.02 * data.max()).astype(np.float32), img.affine)
    on_grid = resample_from_to(brain, (shape, grid_affine(shape, spacing, origin)), order=1, mode="constant", cval=0)
    mask = np.asarray(on_grid.dataobj) > 0.5
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return mask, distance > outside_mm


def _border(shape: tuple[int, ...]) -> np.ndarray:
    inner = np.zeros(shape, bool)
    inner[tuple(slice(BORDER_VOXELS, s - BORDER_VOXELS) for s in shape)] = True
    return ~inner


def _mask_on_grid(path: str, data_cfg: dict) -> np.ndarray:
    mask_img, mask_data = load_checked(path)
    return to_grid(mask_img, (mask_data > 0).astype(np.float32), data_cfg) > 0.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return round(2 * float((a & b).sum()) / total, 4) if total else 0.0


def image_measures(path: str, mask_path: str | None, data_cfg: dict, reference_path: str | None = None) -> dict:
    """The QC numbers of one image on the grid (module docstring); BadInputError when it cannot be read."""
    img, data = load_checked(path)
    vol = to_grid(img, data, data_cfg)
    brain = _mask_on_grid(mask_path, data_cfg) if mask_path else vol > 0
    reference = {"dice_reference": _dice(brain, _mask_on_grid(reference_path, data_cfg))} if reference_path else {}
    template, far = template_masks(_grid_key(data_cfg["grid"]), float(data_cfg["qc"]["outside_mm"]))
    count = int(brain.sum())
    if count == 0:
        return {"dice_template": 0.0, "border_fraction": 0.0, "outside_template": 0.0, "brain_volume_ml": 0.0,
                "normalized_mean": 0.0, **reference}
    intensity = data_cfg["intensity"]
    normalized, _ = normalize(vol, brain, intensity["lower_percentile"], intensity["upper_percentile"])
    inside = brain & template
    voxel_ml = float(np.prod(data_cfg["grid"]["spacing"])) / 1000
    return {
        "dice_template": _dice(brain, template),
        "border_fraction": round(float((brain & _border(brain.shape)).sum()) / count, 5),
        "outside_template": round(float((brain & far).sum()) / count, 5),
        "brain_volume_ml": round(count * voxel_ml, 1),
        "normalized_mean": round(float(normalized[inside].mean()) if inside.any() else 0.0, 4),
        **reference,
    }


def _measure_or_reason(job: tuple[str, str | None, dict, str | None]):
    try:
        return image_measures(*job)
    except (BadInputError, ValueError) as exc:
        return getattr(exc, "reason", str(exc))


def robust_z(values: list[float]) -> list[float | None]:
    """(x - median) / (1.4826 MAD) of each value; None for all when fewer than 5 values or no spread."""
    if len(values) < 5:
        return [None] * len(values)
    x = np.asarray(values, float)
    mad = 1.4826 * np.median(np.abs(x - np.median(x)))
    return [None] * len(values) if mad == 0 else [round(float(v), 2) for v in (x - np.median(x)) / mad]


def image_flags(row: dict, qc: dict) -> list[str]:
    """The checks one measured image fails, each as a short sentence with its value and threshold."""
    flags = []
    if row["dice_template"] < qc["min_dice"]:
        flags.append(f"Dice with the template brain {row['dice_template']:.2f} < {qc['min_dice']} (not in MNI space?)")
    if row["border_fraction"] > qc["max_border_fraction"]:
        flags.append(f"{100 * row['border_fraction']:.2f} % of the brain on the field of view's border "
                     f"> {100 * qc['max_border_fraction']:.2f} % (shifted or cropped?)")
    if row["outside_template"] > qc["max_outside_template"]:
        flags.append(f"{100 * row['outside_template']:.1f} % of the image farther than {qc['outside_mm']} mm outside "
                     f"the template brain > {100 * qc['max_outside_template']:.1f} % (skull or scalp left?)")
    for key, what in (("volume_z", "brain volume"), ("mean_z", "normalised brain intensity")):
        if qc["max_robust_z"] is not None and row[key] is not None and abs(row[key]) > qc["max_robust_z"]:
            flags.append(f"{what} robust z {row[key]:+.1f} within its dataset (|z| > {qc['max_robust_z']})")
    return flags


def _reference_path(row: dict, datasets: list[dict]) -> str | None:
    """The row's reference brain mask: its dataset's `reference_mask` with the row's subject and session."""
    from brainddpm.bids import reference_mask_path

    pattern = next((d.get("reference_mask") for d in datasets if d["name"] == row["dataset"]), None)
    return reference_mask_path(pattern, row["subject"], row["session"]) if pattern else None


def measure_images(rows: list[dict], data_cfg: dict, jobs: int = 1,
                   datasets: list[dict] = ()) -> tuple[list[dict], list[dict]]:
    """qc.tsv rows (measures, robust z, flags and the decision of data.qc.policy) and the images that could
    not be measured (path, dataset, reason). `datasets` (the config's) give the reference masks."""
    jobs_list = [(r["path"], r.get("mask") if r.get("mask") not in (None, "", "n/a") else None, data_cfg,
                  _reference_path(r, datasets)) for r in rows]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_measure_or_reason, jobs_list))
    else:
        results = [_measure_or_reason(j) for j in jobs_list]
    measured, unreadable = [], []
    for row, res in zip(rows, results):
        if isinstance(res, str):
            unreadable.append({"path": row["path"], "dataset": row["dataset"], "reason": res})
            continue
        measured.append({k: row.get(k) for k in ("path", "dataset", "subject", "session", "orientation",
                                                 "spacing")} | res)
    for dataset in {r["dataset"] for r in measured}:
        mine = [r for r in measured if r["dataset"] == dataset]
        for key, source in (("volume_z", "brain_volume_ml"), ("mean_z", "normalized_mean")):
            for r, z in zip(mine, robust_z([r[source] for r in mine])):
                r[key] = z
    qc, policy = data_cfg["qc"], data_cfg["qc"]["policy"]
    for r in measured:
        flags = image_flags(r, qc)
        r["flags"] = "; ".join(flags)
        r["decision"] = ("exclude" if policy == "exclude" else "warn") if flags else "pass"
    return measured, unreadable


def reason_kind(reason: str) -> str:
    """A reason without its numbers and paths, so that like reasons count together."""
    text = re.sub(r"\d+(\.\d+)?", "N", reason.split(" (")[0].split(";")[0])
    return re.sub(r"/\S+", "<path>", text).strip()


def _numeric(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _unpadded(subject: str) -> str:
    return re.sub(r"(?<=sub-)0+(?=\d)", "", subject)


def participants_check(listed: set[str], subjects: set[str]) -> dict:
    """Images (their subjects, from every dataset that uses one table) without a row of the table's `listed`
    subjects, rows without an image, and a hint when the two differ only in zero padding (sub-1 against
    sub-01)."""
    without_row, without_image = sorted(subjects - listed), sorted(listed - subjects)
    hint = None
    padded = {_unpadded(s): s for s in without_image}
    match = next((s for s in without_row if _unpadded(s) in padded), None)
    if match:
        hint = (f"IDs differ only in zero padding (image {match}, table {padded[_unpadded(match)]}): the table's "
                "participant_id must be the folder's sub-<label>")
    return {"images_without_row": len(without_row), "rows_without_image": len(without_image),
            "examples": without_row[:3], "hint": hint}


def covariate_gaps(rows: list[dict]) -> dict:
    """Per covariate column of the manifest (age, sex and any conditioned one): images with no value, and with a
    value that is not a number where the others are numbers (an age of '72y')."""
    gaps = {}
    for column in [c for c in rows[0] if c in ("age", "sex") or c not in QC_COLUMNS + ["shape", "sha256", "mask"]]:
        values = [str(r.get(column) or "").strip() for r in rows]
        present = [v for v in values if v.lower() not in MISSING]
        numeric = sum(map(_numeric, present)) > len(present) / 2
        unreadable = [v for v in present if numeric and not _numeric(v)]
        if len(present) < len(values) or unreadable:
            gaps[column] = {"missing": len(values) - len(present), "unreadable": len(unreadable),
                            "examples": sorted(set(unreadable))[:3]}
    return gaps


def _reference_dice(rows: list[dict]) -> dict | None:
    """Dice with the reference masks over one dataset's images (count, min, median), or None without them."""
    values = [float(r["dice_reference"]) for r in rows if r.get("dice_reference") not in (None, "", "n/a")]
    return {"images": len(values), "min": round(min(values), 4),
            "median": round(float(np.median(values)), 4)} if values else None


def data_summary(datasets: list[dict], manifest: list[dict], excluded: list[dict], qc_rows: list[dict],
                 unreadable: list[dict], policy: str) -> dict:
    """What came in and what was left out, per dataset and reason (module docstring)."""
    out = {"policy": policy, "datasets": {}}
    for ds in datasets:
        name = ds["name"]
        rows = [r for r in manifest if r["dataset"] == name]
        flagged = [r for r in qc_rows if r["dataset"] == name and r["flags"]]
        reasons: dict[str, int] = {}
        for e in [e for e in excluded if e["dataset"] == name]:
            reasons[reason_kind(e["reason"])] = reasons.get(reason_kind(e["reason"]), 0) + 1
        for r in flagged if policy == "exclude" else []:
            for flag in r["flags"].split("; "):
                reasons[f"QC: {reason_kind(flag)}"] = reasons.get(f"QC: {reason_kind(flag)}", 0) + 1
        left_out = sum(1 for e in excluded if e["dataset"] == name) + (len(flagged) if policy == "exclude" else 0)
        out["datasets"][name] = {
            "found": len(rows) + sum(1 for e in excluded if e["dataset"] == name), "in": len(rows) - (
                len(flagged) if policy == "exclude" else 0), "out": left_out, "reasons": reasons,
            "flagged": len(flagged), "unmeasured": sum(1 for u in unreadable if u["dataset"] == name),
            "covariates": covariate_gaps(rows) if rows else {},
            "participants": None,
            "reference_dice": _reference_dice([r for r in qc_rows if r["dataset"] == name]),
        }
    for table in sorted({ds["participants"] for ds in datasets if ds.get("participants")}):
        users = [ds["name"] for ds in datasets if ds.get("participants") == table]  # one table, several sites
        listed = {sub for sub, _ in read_participants(table)[0]}
        check = participants_check(listed, {r["subject"] for r in manifest if r["dataset"] in users})
        for name in users:
            without = sorted({r["subject"] for r in manifest if r["dataset"] == name} - listed)
            out["datasets"][name]["participants"] = {**check, "table": table, "images_without_row": len(without),
                                                     "examples": without[:3]}
    out["left_out"] = [{**e, "stage": "manifest"} for e in excluded] + [
        {"path": r["path"], "dataset": r["dataset"], "reason": r["flags"], "stage": "qc"}
        for r in qc_rows if r["flags"] and policy == "exclude"]
    out["flagged"] = [{"path": r["path"], "dataset": r["dataset"], "flags": r["flags"]}
                      for r in qc_rows if r["flags"]]
    return out


def gap_sentences(d: dict) -> list[str]:
    """One dataset's covariate gaps and participants-table mismatches, a sentence each (the console's summary
    and the report's Data section both list them)."""
    sentences = []
    for column, gap in d["covariates"].items():
        bad = f", {gap['unreadable']} unreadable (e.g. {', '.join(map(repr, gap['examples']))})" \
            if gap["unreadable"] else ""
        sentences.append(f"covariate {column}: {gap['missing']} images without a value{bad}")
    p = d["participants"]
    if p and (p["images_without_row"] or p["rows_without_image"]):
        examples = f" (e.g. {', '.join(p['examples'])})" if p["examples"] else ""
        sentences.append(f"{p['table']}: {p['images_without_row']} images have no row{examples}; "
                         f"{p['rows_without_image']} of its rows match no image of the datasets that use it")
        if p["hint"]:
            sentences.append(f"hint: {p['hint']}")
    return sentences


def summary_lines(summary: dict) -> list[str]:
    """The data summary as console lines: one per dataset, then each reason, gap and hint."""
    lines = [f"Data (input QC policy: {summary['policy']}):"]
    for name, d in summary["datasets"].items():
        lines.append(f"  {name}: {d['found']} images found, {d['in']} in, {d['out']} left out, "
                     f"{d['flagged']} flagged by QC")
        if d.get("reference_dice"):
            ref = d["reference_dice"]
            lines.append(f"    brain recovered: Dice with the reference masks median {ref['median']:.3f}, "
                         f"min {ref['min']:.3f} ({ref['images']} images)")
        lines += [f"    left out, {count}x: {reason}" for reason, count in d["reasons"].items()]
        lines += [f"    {sentence}" for sentence in gap_sentences(d)]
    if summary["policy"] == "warn" and summary["flagged"]:
        lines.append("  flagged images train all the same (data.qc.policy: warn); see results/qc/qc.tsv")
    return lines


def write_worst_mosaic(qc_rows: list[dict], data_cfg: dict, png: Path, count: int = 6) -> None:
    """Mid-slices (axial, coronal, sagittal) on the grid of the images that score worst: most flags first, then
    the lowest Dice with the template; the template brain's outline over each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = sorted(qc_rows, key=lambda r: (-len([f for f in r["flags"].split("; ") if f]),
                                           r["dice_template"]))[:count]
    template, _ = template_masks(_grid_key(data_cfg["grid"]), float(data_cfg["qc"]["outside_mm"]))
    fig, axes = plt.subplots(max(len(worst), 1), 3, figsize=(7.5, 2.6 * max(len(worst), 1)), squeeze=False)
    for row_axes, r in zip(axes, worst):
        img, data = load_checked(r["path"])
        vol = to_grid(img, data, data_cfg)
        centre = [s // 2 for s in vol.shape]
        views = [(vol[:, :, centre[2]], template[:, :, centre[2]]), (vol[:, centre[1], :], template[:, centre[1], :]),
                 (vol[centre[0], :, :], template[centre[0], :, :])]
        for ax, (plane, outline) in zip(row_axes, views):
            ax.imshow(np.rot90(plane), cmap="gray", vmin=0, vmax=np.percentile(vol[vol > 0], 99.5) if vol.any() else 1)
            ax.contour(np.rot90(outline.astype(float)), levels=[0.5], colors="tab:red", linewidths=0.6)
            ax.set_axis_off()
        row_axes[0].set_title(f"{Path(r['path']).name.split('.nii')[0]}: Dice {r['dice_template']:.2f}"
                              f"{' (flagged)' if r['flags'] else ''}", fontsize=7, loc="left")
    for ax in axes.flat[len(worst) * 3:]:
        ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def run_qc(cfg: dict, manifest_path: Path, excluded_path: Path, qc_path: Path, summary_path: Path,
           mosaic_path: Path, jobs: int = 1) -> dict:
    """Measure every manifest image, apply data.qc.policy, and write qc.tsv, data_summary.json and the mosaic;
    under `fail` a BadInputError naming every flagged image (after the console has seen them)."""
    data_cfg = cfg["data"]
    manifest, excluded = read_tsv(manifest_path), read_tsv(excluded_path)
    qc_rows, unreadable = measure_images(manifest, data_cfg, jobs=jobs, datasets=cfg["datasets"])
    for u in unreadable:
        log.warning("input QC could not measure %s: %s", u["path"], u["reason"])
    summary = data_summary(cfg["datasets"], manifest, excluded, qc_rows, unreadable, data_cfg["qc"]["policy"])
    for line in summary_lines(summary):
        log.info("%s", line)
    flagged = [r for r in qc_rows if r["flags"]]
    if flagged and data_cfg["qc"]["policy"] == "fail":
        lines = "\n".join(f"  {r['path']}: {r['flags']}" for r in flagged)
        raise BadInputError(flagged[0]["path"], f"failed input QC (data.qc.policy: fail; {len(flagged)} "
                            f"image(s)):\n{lines}")
    write_tsv(qc_rows, QC_COLUMNS, qc_path)
    with atomic_path(summary_path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    write_worst_mosaic(qc_rows, data_cfg, mosaic_path)
    return summary


def excluded_by_qc(qc_path: Path) -> set[str]:
    """The paths that qc.tsv leaves out (decision `exclude`, under data.qc.policy: exclude)."""
    return {r["path"] for r in read_tsv(qc_path) if r["decision"] == "exclude"}


def console_summary(summary_path: Path, indexes: list[Path] = ()) -> list[str]:
    """The lines the workflow prints at the end of a run: the data summary, and the images the shards left out
    (read from the splits' index.json); [] before the qc rule has run."""
    if not Path(summary_path).is_file():
        return []
    lines = summary_lines(json.loads(Path(summary_path).read_text()))
    for index in indexes:
        if Path(index).is_file():
            left = json.loads(Path(index).read_text()).get("excluded", [])
            lines += [f"  left out while sharding ({Path(index).parent.name}): {e['path']}: {e['reason']}"
                      for e in left]
    return lines
