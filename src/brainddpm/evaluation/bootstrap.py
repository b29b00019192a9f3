"""Bootstrap confidence intervals over precomputed matrices, split into independent chunks.

Everything expensive is computed once (brainddpm.evaluation.metrics): the linear Gram matrices of the
flattened volumes, the pairwise MS-SSIM matrices and the feature vectors.  A resample only
re-weights them with count vectors, so 1000 resamples cost a few seconds.

Usage (each step can run in its own job; arrays travel as .npz files)::

    inputs = prepare_inputs(kxx, kyy, kxy, n_voxels, msssim_real, msssim_syn,
                            msssim_real_bbox, msssim_syn_bbox, feat_real, feat_syn, halves_seed)
    save_npz("inputs.npz", inputs)
    # job k of K, (b_start, b_stop) = chunk_bounds(n_boot, K)[k]:
    save_npz(f"chunk{k}.npz", resample_chunk(load_npz("inputs.npz"), b_start, b_stop, seed))
    # gather:
    result = gather(point_estimates(inputs), [load_npz(f) for f in chunk_files], level=0.95)
    # result[name] == {"value", "ci_low", "ci_high", "n_boot"}

Inputs (dict of arrays): "kxx", "kyy", "kxy" (float64 linear Gram, real/synthetic), "n_voxels",
"sigma2" (Gaussian bandwidth, median heuristic on the full pooled set, then held fixed),
"msssim_real", "msssim_syn" and optionally "msssim_real_bbox", "msssim_syn_bbox" (pairwise
matrices), optionally "feat_real", "feat_syn" (features for FID), "half_a", "half_b" (the two
disjoint halves of the real set, for the floor_* metrics).

Resampling: resample b draws, with ``np.random.default_rng([seed, b])``, the real indices, the
synthetic indices, then indices within each real half (all with replacement, independently).
So the result for a seed does not depend on how the resamples are split into chunks.  Within-set
terms (MMD within-set sums, mean pairwise MS-SSIM) drop pairs whose two members are copies of the
same original; the biased MMD keeps its diagonal with the point estimate's weight 1/n.  Intervals
are percentile intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainddpm.evaluation import metrics
from brainddpm.fileio import atomic_path

FID_CAVEAT = (
    "FID is biased upward at small N (86 volumes against 512 or 2048 features): the point estimate "
    "includes a positive small-sample term, and resampling with replacement (fewer distinct "
    "volumes per resample) increases it further, so the bootstrap distribution can lie entirely "
    "above the point estimate.  Report the point estimate and the interval together, and compare "
    "only FIDs computed with the same N, network and preprocessing (floor_fid uses N/2 per half)."
)

MMD_NAMES = ("mmd_linear_unbiased", "mmd_linear_unbiased_per_voxel", "mmd_monai_generative",
             "mmd_gaussian_unbiased")

LABELS = {
    "mmd_linear_unbiased": "MMD² unbiased, linear kernel on flattened volumes (MONAI core MMDMetric)",
    "mmd_linear_unbiased_per_voxel": "MMD² unbiased, linear kernel, divided by the voxel count",
    "mmd_monai_generative": "MMD, MONAI GenerativeModels MMDMetric (||mean_r-mean_s||²/V; "
                            "comparable with the reference study's 0.036)",
    "mmd_gaussian_unbiased": "MMD² unbiased, Gaussian kernel, median-heuristic bandwidth",
    "fid": "FID on MedicalNet features",
    "msssim_synthetic": "mean pairwise MS-SSIM within the synthetic set, whole volume (as the reference study)",
    "msssim_real": "mean pairwise MS-SSIM within the real set, whole volume",
    "msssim_synthetic_bbox": "mean pairwise MS-SSIM within the synthetic set, brain bounding box",
    "msssim_real_bbox": "mean pairwise MS-SSIM within the real set, brain bounding box",
}
LABELS.update({f"floor_{k}": f"floor (real half vs real half): {LABELS[k]}" for k in (*MMD_NAMES, "fid")})


# --------------------------------------------------------------------------- inputs

def prepare_inputs(kxx, kyy, kxy, n_voxels: int, msssim_real, msssim_syn, msssim_real_bbox=None,
                   msssim_syn_bbox=None, feat_real=None, feat_syn=None, halves_seed: int = 0) -> dict:
    """Bundle the precomputed matrices; fixes the Gaussian bandwidth and the real halves."""
    kxx, kyy, kxy = (np.asarray(k, dtype=np.float64) for k in (kxx, kyy, kxy))
    n, m = len(kxx), len(kyy)
    if kxx.shape != (n, n) or kyy.shape != (m, m) or kxy.shape != (n, m):
        raise ValueError(f"Gram shapes do not fit: {kxx.shape}, {kyy.shape}, {kxy.shape}")
    half_a, half_b = metrics.real_halves(n, halves_seed)
    out = {"kxx": kxx, "kyy": kyy, "kxy": kxy, "n_voxels": np.int64(n_voxels),
           "sigma2": np.float64(metrics.median_heuristic(kxx, kyy, kxy)),
           "half_a": half_a, "half_b": half_b}
    for key, mat, size in (("msssim_real", msssim_real, n), ("msssim_syn", msssim_syn, m),
                           ("msssim_real_bbox", msssim_real_bbox, n), ("msssim_syn_bbox", msssim_syn_bbox, m)):
        if mat is not None:
            mat = np.asarray(mat, dtype=np.float64)
            if mat.shape != (size, size):
                raise ValueError(f"{key} must be {size}x{size}, got {mat.shape}")
            out[key] = mat
    if (feat_real is None) != (feat_syn is None):
        raise ValueError("give both feat_real and feat_syn, or neither")
    if feat_real is not None:
        fr, fs = np.asarray(feat_real, dtype=np.float64), np.asarray(feat_syn, dtype=np.float64)
        if len(fr) != n or len(fs) != m or fr.shape[1:] != fs.shape[1:] or fr.ndim != 2:
            raise ValueError(f"features must be ({n}, F) and ({m}, F), got {fr.shape} and {fs.shape}")
        out["feat_real"], out["feat_syn"] = fr, fs
    return out


def save_npz(path: str | Path, arrays: dict) -> None:
    """Write a dict of arrays to exactly ``path`` (np.savez would append .npz to other names)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_npz(path: str | Path) -> dict:
    """Read a dict of arrays written by :func:`save_npz`."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def chunk_bounds(n_boot: int, jobs: int) -> list[tuple[int, int]]:
    """Split resamples 0..n_boot-1 into ``jobs`` contiguous (b_start, b_stop) ranges."""
    edges = np.linspace(0, n_boot, min(jobs, n_boot) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------- weighted statistics

def _blocks(inputs: dict) -> dict:
    """Kernel blocks stacked per index space: [linear, Gaussian(, features)] and MS-SSIM stacks."""
    kxx, kyy, kxy = inputs["kxx"], inputs["kyy"], inputs["kxy"]
    gxx, gyy, gxy = metrics.gaussian_grams(kxx, kyy, kxy, float(inputs["sigma2"]))
    within_x, within_y, cross = [kxx, gxx], [kyy, gyy], [kxy, gxy]
    fxx = fxy = None
    if "feat_real" in inputs:
        fr, fs = inputs["feat_real"], inputs["feat_syn"]
        shift = np.concatenate([fr, fs]).mean(0)  # FID is translation invariant; centring helps precision
        fr, fs = fr - shift, fs - shift
        fxx, fyy, fxy = fr @ fr.T, fs @ fs.T, fr @ fs.T
        within_x, within_y, cross = within_x + [fxx], within_y + [fyy], cross + [fxy]
    a, b = inputs["half_a"], inputs["half_b"]

    def pair(wa, wb, cr, fab):
        return {"wa": (np.hstack(wa), np.stack([np.diag(k) for k in wa])),
                "wb": (np.hstack(wb), np.stack([np.diag(k) for k in wb])),
                "cross": np.hstack(cr), "fab": fab, "n_voxels": int(inputs["n_voxels"])}

    sub = lambda k, i, j: k[np.ix_(i, j)]  # noqa: E731
    floor_within = [kxx, gxx] + ([fxx] if fxx is not None else [])
    out = {"main": pair(within_x, within_y, cross, fxy),
           "floor": pair([sub(k, a, a) for k in floor_within], [sub(k, b, b) for k in floor_within],
                         [sub(k, a, b) for k in floor_within], None if fxx is None else sub(fxx, a, b))}
    for side, suffix in (("real", "real"), ("syn", "synthetic")):
        names = [k for k in (f"msssim_{side}", f"msssim_{side}_bbox") if k in inputs]
        if names:
            mats = [inputs[k] for k in names]
            out[f"div_{side}"] = (np.hstack(mats), np.stack([np.diag(k) for k in mats]),
                                  [n.replace(f"msssim_{side}", f"msssim_{suffix}") for n in names])
    return out


def _within(c: np.ndarray, stack: tuple[np.ndarray, np.ndarray]):
    """Per kernel: mean over pairs of distinct originals, mean of the diagonal, Σc_ic_jK_ij, Σc_iK_ii."""
    mats, diags = stack
    quad = (c @ mats).reshape(len(diags), -1) @ c
    diag_c, diag_c2 = diags @ c, diags @ (c * c)
    n = c.sum()
    pairs = n * n - (c * c).sum()
    off = (quad - diag_c2) / pairs if pairs > 0 else np.full(len(diags), np.nan)
    return off, diag_c / n, quad, diag_c


def _two_sample(ca: np.ndarray, cb: np.ndarray, blk: dict) -> dict[str, float]:
    """MMD variants (and FID when features are present) between two count-weighted samples."""
    n, m = ca.sum(), cb.sum()
    off_a, dmean_a, quad_a, diag_a = _within(ca, blk["wa"])
    off_b, dmean_b, quad_b, diag_b = _within(cb, blk["wb"])
    cross = (ca @ blk["cross"]).reshape(len(quad_a), -1) @ cb / (n * m)
    full_a = dmean_a / n + (n - 1) / n * off_a  # mean over all n² pairs, diagonal weighted 1/n
    full_b = dmean_b / m + (m - 1) / m * off_b
    lin = off_a[0] + off_b[0] - 2 * cross[0]
    out = {"mmd_linear_unbiased": lin, "mmd_linear_unbiased_per_voxel": lin / blk["n_voxels"],
           "mmd_monai_generative": (full_a[0] + full_b[0] - 2 * cross[0]) / blk["n_voxels"],
           "mmd_gaussian_unbiased": off_a[1] + off_b[1] - 2 * cross[1]}
    fab = blk["fab"]
    if fab is not None:
        mean_diff2 = quad_a[2] / n**2 + quad_b[2] / m**2 - 2 * cross[2]
        tr_a = (diag_a[2] - quad_a[2] / n) / (n - 1)
        tr_b = (diag_b[2] - quad_b[2] / m) / (m - 1)
        r = fab @ cb / m
        s = ca @ fab / n
        centred = fab - r[:, None] - s[None, :] + r @ ca / n
        rows, cols = ca > 0, cb > 0
        scaled = np.sqrt(ca[rows])[:, None] * centred[np.ix_(rows, cols)] * np.sqrt(cb[cols])[None, :]
        nuclear = np.linalg.svd(scaled, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
        out["fid"] = mean_diff2 + tr_a + tr_b - 2 * nuclear
    return out


def _evaluate(blocks: dict, cx, cy, ca, cb) -> dict[str, float]:
    """All metrics for one set of count vectors (real, synthetic, real half a, real half b)."""
    out = _two_sample(cx, cy, blocks["main"])
    out.update({f"floor_{k}": v for k, v in _two_sample(ca, cb, blocks["floor"]).items()})
    for side, c in (("real", cx), ("syn", cy)):
        if f"div_{side}" in blocks:
            mats, diags, names = blocks[f"div_{side}"]
            off = _within(c, (mats, diags))[0]
            out.update(dict(zip(names, off)))
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- public API

def point_estimates(inputs: dict) -> dict[str, float]:
    """Every metric on the full sets (floors: on the two real halves)."""
    blocks = _blocks(inputs)
    n, m = len(inputs["kxx"]), len(inputs["kyy"])
    na, nb = len(inputs["half_a"]), len(inputs["half_b"])
    return _evaluate(blocks, np.ones(n), np.ones(m), np.ones(na), np.ones(nb))


def resample_chunk(inputs: dict, b_start: int, b_stop: int, seed: int) -> dict[str, np.ndarray]:
    """Metrics for resamples b_start..b_stop-1 (arrays of length b_stop-b_start), plus "resample_index"."""
    if not 0 <= b_start <= b_stop:
        raise ValueError(f"bad resample range {b_start}..{b_stop}")
    blocks = _blocks(inputs)
    sizes = (len(inputs["kxx"]), len(inputs["kyy"]), len(inputs["half_a"]), len(inputs["half_b"]))
    rows = []
    for b in range(b_start, b_stop):
        rng = np.random.default_rng([int(seed), b])
        counts = [np.bincount(rng.integers(0, k, k), minlength=k).astype(np.float64) for k in sizes]
        rows.append(_evaluate(blocks, *counts))
    names = list(rows[0]) if rows else list(point_estimates(inputs))
    out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in names}
    out["resample_index"] = np.arange(b_start, b_stop)
    return out


def gather(point: dict[str, float], chunks: list[dict], level: float = 0.95) -> dict[str, dict]:
    """Percentile intervals from the chunks' resamples: name -> {value, ci_low, ci_high, n_boot}.

    Checks that the chunks' resample indices are exactly 0..B-1 (no chunk missing or repeated).
    ``n_boot`` counts the finite resamples (a resample made of one repeated volume has no pairs).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = np.concatenate([np.asarray(c["resample_index"]) for c in chunks]) if chunks else np.array([])
    if not np.array_equal(np.sort(idx), np.arange(len(idx))) or len(idx) == 0:
        raise ValueError("bootstrap chunks do not cover resamples 0..B-1 exactly once")
    order = np.argsort(idx)
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    result = {}
    for name, value in point.items():
        missing = [i for i, c in enumerate(chunks) if name not in c]
        if missing:
            raise ValueError(f"metric {name!r} missing from bootstrap chunk(s) {missing}")
        vals = np.concatenate([np.asarray(c[name], dtype=np.float64) for c in chunks])[order]
        vals = vals[np.isfinite(vals)]
        lo, hi = np.percentile(vals, q) if len(vals) else (np.nan, np.nan)
        result[name] = {"value": float(value), "ci_low": float(lo), "ci_high": float(hi),
                        "n_boot": int(len(vals))}
    return result


def subject_resamples(subjects: list[str], count: int, seed: int) -> list[np.ndarray]:
    """`count` bootstrap resamples of the test volumes, drawn by subject: each draws as many subjects as
    there are, with replacement, and takes all volumes (sessions) of each drawn subject."""
    names = sorted(set(subjects))
    volumes = [np.flatnonzero(np.asarray(subjects) == s) for s in names]
    rng = np.random.default_rng(seed)
    return [np.concatenate([volumes[i] for i in rng.integers(0, len(names), size=len(names))]) for _ in range(count)]


def subject_means_ci(values: dict[str, np.ndarray], subjects: list[str], n_boot: int, seed: int,
                     level: float = 0.95) -> dict[str, dict]:
    """Mean of per-volume values with a percentile interval from `subject_resamples` (every session of a
    drawn subject comes with it): name -> {value, ci_low, ci_high, n_boot}."""
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    draws = subject_resamples(subjects, n_boot, seed)
    result = {}
    for name, vals in values.items():
        vals = np.asarray(vals, dtype=np.float64)
        lo, hi = np.percentile([vals[d].mean() for d in draws], q)
        result[name] = {"value": float(vals.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot}
    return result
