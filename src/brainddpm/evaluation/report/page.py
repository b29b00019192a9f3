"""The page itself: what the synthetic NIfTI files are (grid, voxel size, how to open them) and report.md as
one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from brainddpm.fileio import atomic_path


def part_grid(part: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    with h5py.File(part, "r") as f:
        return f["affine"][()], tuple(int(s) for s in f["images"].shape[-3:])


def grid_markdown(affine: np.ndarray, shape: tuple[int, ...],
                  folder: str = "results/samples/<run>/<sampler>/nifti-*/") -> str:
    """What the synthetic NIfTI are: the model's grid, its voxel size, and how to look at them."""
    voxel = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    size = "x".join(f"{v:.2f}" for v in voxel)
    return "\n".join([
        "## The synthetic NIfTI files", "",
        f"Each synthetic volume is written at the model's shape, {'x'.join(map(str, shape))} voxels of "
        f"**{size} mm**, covering the field of view of the MNI 1 mm grid the inputs were resampled to (RAS, "
        f"qform and sform code 4, MNI152): `{folder}`. FSLeyes and ITK-SNAP "
        "open them as they are and overlay them on the MNI152 template in world coordinates (`fsleyes "
        "$FSLDIR/data/standard/MNI152_T1_1mm.nii.gz synthetic-0000_ddpm.nii.gz`). Tools that expect the 1 mm "
        "grid itself get a copy resampled onto it (trilinear) with `brainddpm to-mni --config <your configs> "
        "--out <folder> <files>`. Intensities are in [0, 1] (0: background).", ""])


def write_html(markdown_text: str, folder: Path, path: Path) -> None:
    """report.md as one self-contained HTML page (the figures inlined), for `snakemake --report` and e-mail."""
    import base64
    import re

    import markdown

    def inline(match: re.Match) -> str:
        image = folder / match.group(2)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, markdown_text),
                             extensions=["tables"])
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>brain-ddpm report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
            "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .5em}"
            "img{max-width:100%}code{background:#f3f3f3}</style></head><body>" + body + "</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page)
