"""The latent model's section: how faithfully its autoencoder reconstructs unseen volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainddpm.evaluation.report.common import fmt, md_table
from brainddpm.fileio import atomic_path


def reconstruction_markdown(doc: dict) -> str:
    """The autoencoder's section: how well it reconstructs unseen volumes, the latent model's ceiling."""
    m = doc["metrics"]
    roi = doc["decode"].get("roi")
    decode = f"windows of {'x'.join(map(str, roi))} latent voxels, Gaussian blending" if roi else "whole volume"
    rows = [[name.upper(), fmt(m[name], 2 if name == "psnr" else 4), doc["definitions"][name]]
            for name in ("psnr", "ssim", "mae")]
    return "\n".join([
        "## Reconstruction (autoencoder of the latent model)", "",
        f"Each of the {doc['n']} validation volumes ({doc['n_subjects']} subjects) encoded and decoded exactly as a "
        f"sampled latent is decoded ({decode}; "
        f"latent scale factor {doc['scale_factor']:.4f}); 95% intervals from resampling subjects. Synthetic volumes "
        "cannot be more faithful than this: it bounds what the latent diffusion model can reach.", "",
        md_table(["metric", "mean [95% CI]", "definition"], rows), "",
        "![validation volumes and their reconstructions](reconstruction.png)", ""])


def reconstruction_section(reconstruction: Path, out: Path) -> str:
    """The section from the reconstruction rule's JSON, its figure (beside it) copied as reconstruction.png."""
    reconstruction = Path(reconstruction)
    figure = reconstruction.with_suffix(".png")
    if figure.is_file():
        with atomic_path(out / "reconstruction.png") as tmp:
            shutil.copyfile(figure, tmp)
    return reconstruction_markdown(json.loads(reconstruction.read_text()))
