"""The evaluation stage, one function per rule: features -> bootstrap chunks -> gathered metrics,
and the memorization check.

`run_features` does every expensive computation once (Gram matrices, pairwise MS-SSIM matrices,
MedicalNet features) on the n real validation and n synthetic volumes and stores them with the ids
of the volumes used; bootstrap jobs only index those arrays (brainddpm.evaluation.bootstrap).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from brainddpm.data.shards import read_volumes, split_files
from brainddpm.errors import BadInputError
from brainddpm.evaluation import bootstrap, metrics
from brainddpm.fileio import atomic_path

log = logging.getLogger(__name__)
_REAL_SUBSET_STREAM = 1  # stream id of the real-subset draw, apart from the bootstrap's streams


def _ids(meta: list[dict]) -> list[dict]:
    return [{k: m[k] for k in ("subject", "session", "dataset", "source_sha256")} for m in meta]


def select_real(val_dir: Path, n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """n validation volumes: all if there are at most n, else a seeded subset (kept in index order)."""
    vols, meta, _ = read_volumes(split_files(val_dir))
    if len(vols) > n:
        keep = np.sort(np.random.default_rng([seed, _REAL_SUBSET_STREAM]).choice(len(vols), n, replace=False))
        vols, meta = vols[keep], [meta[i] for i in keep]
    return vols, meta


def select_synthetic(parts: list[Path], n: int) -> tuple[np.ndarray, list[dict]]:
    """The first n synthetic volumes by sample index, whatever job made them."""
    vols, meta, _ = read_volumes(parts)
    order = np.argsort([m["subject"] for m in meta], kind="stable")[:n]
    return vols[order], [meta[i] for i in order]


def _json_dump(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def fid_features(eval_cfg: dict, real: np.ndarray, syn: np.ndarray, device: str):
    """MedicalNet features, or None with the reason when no weights are configured/present."""
    from brainddpm.evaluation.medicalnet import extract_features, load_medicalnet

    fid = eval_cfg["fid"]
    if not fid["weights"]:
        return None, "evaluate.fid.weights is null"
    if not Path(fid["weights"]).exists():
        return None, f"weights file {fid['weights']} not found (run `snakemake fetch_fid_weights` on a login node)"
    model = load_medicalnet(fid["network"], fid["weights"], device)
    mask = (real[:, 0] > 0).any(axis=0)  # the real anatomy normalises both sets alike
    return (extract_features(real, model, device=device, mask=mask),
            extract_features(syn, model, device=device, mask=mask)), None


def run_features(eval_cfg: dict, seed: int, val_dir: Path, parts: list[Path], out: Path, ids_out: Path,
                 device: str = "auto") -> dict:
    from brainddpm.device import pick_device

    device = str(pick_device(device))
    real, real_meta = select_real(val_dir, eval_cfg["n"], seed)
    syn, syn_meta = select_synthetic(parts, eval_cfg["n"])
    if len(real) < 4:
        raise BadInputError(val_dir, f"{len(real)} validation volumes; the metrics need at least 4 (the real-halves "
                                     "floor compares two halves of at least 2)")
    if len(syn) < 2:
        raise BadInputError(parts[0], f"{len(syn)} synthetic volumes; the metrics need at least 2")
    ms = eval_cfg["msssim"]
    log.info("features: %d real vs %d synthetic volumes on %s", len(real), len(syn), device)
    kxx, kyy, kxy = metrics.gram_matrices(real, syn)
    msssim = {}
    # the brain box comes from the real anatomy: noisy synthetic backgrounds would stretch it to the whole volume
    box = metrics.brain_bbox([real], min_size=metrics.msssim_min_size(ms["kernel_size"], ms["scales"]))
    for name, vols in (("real", real), ("syn", syn)):
        for suffix, v in (("", vols), ("_bbox", metrics.crop(vols, box))):
            msssim[name + suffix] = metrics.pairwise_msssim(v, ms["kernel_size"], ms["scales"], ms["data_range"],
                                                            device=device)
    feats, fid_note = fid_features(eval_cfg, real, syn, device)
    inputs = bootstrap.prepare_inputs(
        kxx, kyy, kxy, int(np.prod(real.shape[1:])), msssim["real"], msssim["syn"], msssim["real_bbox"],
        msssim["syn_bbox"], *(feats or (None, None)), halves_seed=seed)
    bootstrap.save_npz(out, inputs)
    ids = {"real": _ids(real_meta), "synthetic": _ids(syn_meta), "fid_note": fid_note,
           "bbox": [[s.start, s.stop] for s in box], "msssim": ms, "fid_network": eval_cfg["fid"]["network"]}
    _json_dump(ids, ids_out)
    return ids


def run_bootstrap(inputs_path: Path, n_boot: int, jobs: int, part: int, seed: int, out: Path) -> None:
    b_start, b_stop = bootstrap.chunk_bounds(n_boot, jobs)[part]
    chunk = bootstrap.resample_chunk(bootstrap.load_npz(inputs_path), b_start, b_stop, seed)
    bootstrap.save_npz(out, chunk)
    log.info("bootstrap resamples %d..%d written to %s", b_start, b_stop - 1, out)


def run_gather(inputs_path: Path, ids_path: Path, chunk_paths: list[Path], out: Path) -> dict:
    inputs = bootstrap.load_npz(inputs_path)
    ids = json.loads(Path(ids_path).read_text())
    result = bootstrap.gather(bootstrap.point_estimates(inputs), [bootstrap.load_npz(p) for p in chunk_paths])
    n_real, n_syn = len(ids["real"]), len(ids["synthetic"])
    for name, entry in result.items():
        entry.update(n_real=n_real, n_synthetic=n_syn, definition=bootstrap.LABELS.get(name, name))
        if name.startswith("floor_"):
            entry.update(n_real=len(inputs["half_a"]), n_synthetic=len(inputs["half_b"]))
    doc = {"metrics": result, "ids": ids, "fid_computed": "fid" in result, "fid_note": ids.get("fid_note"),
           "fid_caveat": bootstrap.FID_CAVEAT, "definitions": "docs/metrics.md"}
    _json_dump(doc, out)
    return doc


def memorization_of(mem_cfg: dict, seed: int, train: np.ndarray, train_meta: list[dict], real: np.ndarray,
                    eval_n: int, parts: list[Path]) -> dict:
    """The memorization check of one sampler's parts: nearest-training-volume correlations, flagged volumes."""
    syn, syn_meta = select_synthetic(parts, eval_n)
    res = metrics.memorization(syn, real, train, percentile=mem_cfg["percentile"], max_train=mem_cfg["max_train"],
                               seed=seed)
    doc = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}
    doc["synthetic_ids"] = [m["subject"] for m in syn_meta]
    doc["training_ids"] = [f"{m['dataset']}/{m['subject']}/{m['session']}" for m in train_meta]
    return doc


def run_memorization(mem_cfg: dict, seed: int, train_dir: Path, val_dir: Path, eval_n: int, parts: list[Path],
                     out: Path) -> dict:
    """Check every sampler's volumes (`parts` grouped by their folder, samples/{run}/{sampler}/part-*.h5).
    memorization.json holds the first sampler's check at its top level (what the report draws) and, with
    more than one sampler, every sampler's under `samplers`."""
    train, train_meta, _ = read_volumes(split_files(train_dir))
    real, _ = select_real(val_dir, eval_n, seed)
    by_sampler: dict[str, list[Path]] = {}
    for part in map(Path, parts):
        by_sampler.setdefault(part.parent.name, []).append(part)
    checks = {s: memorization_of(mem_cfg, seed, train, train_meta, real, eval_n, p) for s, p in by_sampler.items()}
    doc = dict(next(iter(checks.values())))
    if len(checks) > 1:
        doc["samplers"] = checks
    for sampler, check in checks.items():
        log.info("memorization, %s: %d of %d synthetic volumes flagged", sampler, len(check["flagged"]),
                 len(check["synthetic_max_corr"]))
    _json_dump(doc, out)
    return doc
