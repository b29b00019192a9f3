"""The data stage, step by step: manifest -> split -> shards -> index (one function per rule)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from brainddpm.bids import dataset_mask_pattern, manifest_datasets
from brainddpm.config import covariate_names, split_seed
from brainddpm.data.covariates import MISSING, read_covariates
from brainddpm.data.manifest import (
    EXCLUDED_COLUMNS,
    build_manifest,
    manifest_columns,
    read_tsv,
    shard_rows,
    split_columns,
    split_subjects,
    write_tsv,
)
from brainddpm.data.nifti import load_mask, preprocess, target_affine
from brainddpm.data.qc import excluded_by_qc
from brainddpm.data.shards import open_shard, shard_latent, shard_summary, write_index, write_shard
from brainddpm.errors import BadInputError
from brainddpm.fileio import sha256_file

log = logging.getLogger(__name__)


def _fail_on(excluded: list[dict], data_cfg: dict) -> None:
    if excluded and data_cfg["on_bad_input"] == "fail":
        lines = "\n".join(f"  {e['path']}: {e['reason']}" for e in excluded)
        raise BadInputError(excluded[0]["path"],
                            f"{excluded[0]['reason']} (on_bad_input: fail; all problems:\n{lines})")


def run_manifest(cfg: dict, manifest_path: Path, excluded_path: Path, jobs: int = 1,
                 preprocessed: Path | None = None) -> list[dict]:
    """manifest.tsv and excluded.tsv of the configured datasets (those marked `preprocess` read from the
    preprocess rule's folder, `preprocessed`)."""
    datasets = manifest_datasets(cfg["datasets"], preprocessed)
    rows, excluded = build_manifest(datasets, jobs=jobs, progress=sys.stderr.isatty(),
                                    condition=cfg.get("condition"))
    for e in excluded:
        log.warning("excluded %s: %s", e["path"], e["reason"])
    _fail_on(excluded, cfg["data"])
    for ds in cfg["datasets"]:  # a site that is there but gives nothing is a mistake, not a smaller cohort
        if not any(r["dataset"] == ds["name"] for r in rows):
            reasons = "\n".join(f"  {e['path']}: {e['reason']}" for e in excluded if e["dataset"] == ds["name"])
            raise BadInputError(ds.get("root") or ds.get("glob"), f"dataset {ds['name']} has no usable image; "
                                f"every one was excluded:\n{reasons}")
    for name in covariate_names(cfg.get("condition")):
        have = sum(1 for r in rows if str(r.get(name) or "").strip().lower() not in MISSING)
        log.info("covariate %s: %d of %d images have a value", name, have, len(rows))
    write_tsv(excluded, EXCLUDED_COLUMNS, excluded_path)
    masks = any(dataset_mask_pattern(ds) for ds in datasets)
    write_tsv(rows, manifest_columns(cfg.get("condition"), masks), manifest_path)
    log.info("manifest: %d images of %d subjects, %d excluded", len(rows),
             len({(r["dataset"], r["subject"]) for r in rows}), len(excluded))
    return rows


def run_split(cfg: dict, manifest_path: Path, out: Path, qc_path: Path | None = None) -> list[dict]:
    """splits.tsv: whole subjects to train or val; with `qc_path` (data.qc.policy: exclude), without the images
    that input QC left out."""
    data = cfg["data"]
    manifest = read_tsv(manifest_path)
    if qc_path is not None:
        left_out = excluded_by_qc(qc_path)
        manifest = [r for r in manifest if r["path"] not in left_out]
        log.info("input QC left out %d images (data.qc.policy: exclude; results/qc/qc.tsv)", len(left_out))
    rows = split_subjects(manifest, data["val_fraction"], split_seed(cfg),
                          data["stratify_by_dataset"], data["longitudinal"])
    if not any(r["split"] == "val" for r in rows) or not any(r["split"] == "train" for r in rows):
        raise BadInputError(manifest_path, "too few subjects for a train/val split (need at least 2)")
    write_tsv(rows, split_columns(cfg.get("condition"), masks=bool(manifest) and "mask" in manifest[0]), out)
    for split in ("train", "val"):
        sel = [r for r in rows if r["split"] == split]
        log.info("%s: %d images, %d subjects", split, len(sel), len({(r["dataset"], r["subject"]) for r in sel}))
    return rows


def n_shards(splits_path: Path, split: str, per_shard: int) -> int:
    return len(shard_rows(read_tsv(splits_path), split, per_shard))


def run_shard(cfg: dict, splits_path: Path, split: str, index: int, out: Path) -> dict:
    """Preprocess the images of shard `index` of `split` and write the shard."""
    data = cfg["data"]
    shards = shard_rows(read_tsv(splits_path), split, data["volumes_per_shard"])
    if not 0 <= index < len(shards):
        raise BadInputError(splits_path, f"{split} has {len(shards)} shards; there is no shard {index}")
    mask = load_mask(data["mask"], data) if data["mask"] else None
    condition = cfg.get("condition") if covariate_names(cfg.get("condition")) else None
    vols, meta, excluded = [], [], []
    for row in shards[index]:
        try:
            if sha256_file(row["path"]) != row["sha256"]:
                raise BadInputError(row["path"], "file changed since the manifest was written (sha256 differs)")
            own = row.get("mask") not in (None, "", "n/a")  # a per-image mask (mask pattern, layout fmriprep)
            vol, stats = preprocess(row["path"], data, load_mask(row["mask"], data) if own else mask)
        except (BadInputError, FileNotFoundError) as exc:
            reason = getattr(exc, "reason", str(exc))
            excluded.append({"path": row["path"], "dataset": row["dataset"], "reason": reason})
            log.warning("excluded %s: %s", row["path"], reason)
            continue
        vols.append(vol)
        meta.append({**stats, "subject": row["subject"], "session": row["session"], "dataset": row["dataset"],
                     "source_path": row["path"], "source_sha256": row["sha256"]})
        if condition is not None:  # checked when the manifest was written
            meta[-1]["covariates"] = read_covariates(condition, row)
    _fail_on(excluded, data)
    if not vols:
        raise BadInputError(out, f"every image of {split} shard {index} was excluded")
    normalization = {"method": "percentile", **data["intensity"], "range": [0.0, 1.0], "background": 0.0,
                     "mask": data["mask"] or "non-zero voxels", "resize": "monai Resize, trilinear"}
    if any(row.get("mask") not in (None, "", "n/a") for row in shards[index]):
        normalization["mask"] = "each image's own brain mask (manifest.tsv, column mask)"
    summary = write_shard(out, np.stack(vols), meta, target_affine(data), dtype=data["dtype"],
                          compression=data["compression"], compression_level=data["compression_level"],
                          attrs={"normalization": normalization, "split": split, "shard": index, "excluded": excluded})
    log.info("wrote %s: %d volumes", out, summary["count"])
    return summary


def run_index(split: str, shard_paths: list[Path], out: Path) -> dict:
    """index.json of a split's shards, image or latent (whose scale factor and autoencoder must agree)."""
    summaries, excluded, latents = [], [], {}
    for p in sorted(shard_paths):
        summaries.append(shard_summary(p))
        with open_shard(p) as f:
            excluded += json.loads(f.attrs.get("excluded", "[]"))
        latents[p] = shard_latent(p)
    kinds = {json.dumps(v, sort_keys=True) for v in latents.values()}
    if len(kinds) > 1:
        raise BadInputError(out, "its shards disagree on what they hold (images, or latents of different "
                            f"autoencoders or scale factors): {', '.join(f'{p}: {v}' for p, v in latents.items())}")
    index = write_index(split, summaries, out, excluded, latent=next(iter(latents.values()), None))
    log.info("%s: %d volumes in %d shards", split, index["n_volumes"], len(summaries))
    return index
