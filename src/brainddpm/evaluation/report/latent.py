"""The latent model's section: how faithfully its autoencoder reconstructs unseen volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainddpm.evaluation.report.common import fmt, md_table
from brainddpm.fileio import atomic_path


def reconstruction_markdown(doc: dict) -> str:
    """The autoencoder's section: how well it reconstructs unseen volumes, the latent model's ceiling, beside
    naive pooling (reconstruction.py)."""
    m, baselines = doc["metrics"], doc.get("baselines", {})
    roi = doc["decode"].get("roi")
    decode = f"windows of {'x'.join(map(str, roi))} latent voxels, Gaussian blending" if roi else "whole volume"
    arms = list(baselines)
    rows = [[name.upper(), fmt(m[name], 2 if name == "psnr" else 4),
             *(fmt(baselines[a]["metrics"][name], 2 if name == "psnr" else 4) for a in arms),
             doc["definitions"][name]] for name in ("psnr", "ssim", "mae")]
    numbers = doc.get("numbers_per_voxel", {})
    header = ["metric", f"autoencoder ({numbers['autoencoder']:.3g} per voxel)" if numbers else "autoencoder",
              *(f"naive {a.split('_')[1]} pooling ({numbers[a]:.3g} per voxel)" for a in arms), "definition"]
    lines = [
        "## Reconstruction (autoencoder of the latent model)", "",
        f"Each of the {doc['n']} validation volumes ({doc['n_subjects']} subjects) encoded and decoded exactly as a "
        f"sampled latent is decoded ({decode}; "
        f"latent scale factor {doc['scale_factor']:.4f}); 95% intervals from resampling subjects. Synthetic volumes "
        "cannot be more faithful than this: it bounds what the latent diffusion model can reach. Beside it, naive "
        "baselines: each volume average-pooled per axis and trilinearly upsampled back (\"per voxel\": the numbers "
        "kept per image voxel).", "",
        md_table(header, rows), ""]
    if "gain_over_naive" in doc:
        gain = doc["gain_over_naive"]
        g = gain["metrics"]
        verdict = ("better than" if g["psnr"]["ci_low"] > 0 else
                   "worse than" if g["psnr"]["ci_high"] < 0 else "not distinguishable from")
        lines += [f"Against naive {gain['factor']}x pooling (the autoencoder's own factor), paired per volume: "
                  f"PSNR {fmt(g['psnr'], 2, signed=True)} dB, SSIM {fmt(g['ssim'], 4, signed=True)}. The "
                  f"autoencoder is **{verdict}** naive pooling at its compression.", ""]
    lines += ["![validation volumes, their reconstructions and naive 2x pooling](reconstruction.png)", ""]
    return "\n".join(lines)


def reconstruction_section(reconstruction: Path, out: Path) -> str:
    """The section from the reconstruction rule's JSON, its figure (beside it) copied as reconstruction.png."""
    reconstruction = Path(reconstruction)
    figure = reconstruction.with_suffix(".png")
    if figure.is_file():
        with atomic_path(out / "reconstruction.png") as tmp:
            shutil.copyfile(figure, tmp)
    return reconstruction_markdown(json.loads(reconstruction.read_text()))
