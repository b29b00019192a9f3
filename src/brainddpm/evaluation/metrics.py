"""Evaluation metrics for synthetic brain volumes: MMD, FID, pairwise MS-SSIM, memorization.

Pure functions on numpy arrays.  Volumes are float32 arrays shaped (N, 1, D, H, W), intensities
in [0, 1], background exactly 0.  Definitions, data ranges and caveats: docs/metrics.md.

The expensive parts (Gram matrices, pairwise MS-SSIM matrices, features) are computed once by
the functions here; the bootstrap (brainddpm.evaluation.bootstrap) only re-weights those matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from monai.metrics import MultiScaleSSIMMetric

from brainddpm.config import msssim_min_size  # noqa: F401  (plain arithmetic, kept importable without torch)

#: MONAI's default MS-SSIM weights (Wang et al. 2003), finest scale first.
MONAI_MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --------------------------------------------------------------------------- Gram / MMD

def _flat(volumes: np.ndarray) -> np.ndarray:
    v = np.asarray(volumes)
    return v.reshape(v.shape[0], -1)


def gram_matrices(
    real: np.ndarray, synthetic: np.ndarray, chunk_voxels: int = 1 << 18
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-kernel Gram matrices (kxx = X Xᵀ, kyy = Y Yᵀ, kxy = X Yᵀ) of flattened volumes.

    Accumulated in float64 over voxel chunks so that no float64 copy of a whole set is made.
    """
    x, y = _flat(real), _flat(synthetic)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"volume sizes differ: {x.shape[1]} vs {y.shape[1]} voxels")
    kxx = np.zeros((len(x), len(x)))
    kyy = np.zeros((len(y), len(y)))
    kxy = np.zeros((len(x), len(y)))
    for s in range(0, x.shape[1], chunk_voxels):
        xs = x[:, s : s + chunk_voxels].astype(np.float64)
        ys = y[:, s : s + chunk_voxels].astype(np.float64)
        kxx += xs @ xs.T
        kyy += ys @ ys.T
        kxy += xs @ ys.T
    return kxx, kyy, kxy


def mmd_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Gretton's unbiased MMD² (U-statistic, diagonals excluded) for any kernel's Gram blocks.

    With the linear-kernel Gram this is exactly ``monai.metrics.MMDMetric`` (y=real, y_pred=synthetic).
    """
    m, n = len(kxx), len(kyy)
    if m < 2 or n < 2:
        raise ValueError("unbiased MMD needs at least two samples in each set")
    a = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    b = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(a + b - 2.0 * kxy.mean())


def mmd_monai_generative(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, n_voxels: int) -> float:
    """MMD of MONAI GenerativeModels' ``MMDMetric``: mean(Kxx)+mean(Kyy)-2 mean(Kxy), kernel x·y/V.

    Keeps the diagonal (biased, always >= 0); equals ||mean_x - mean_y||² / V.  This is the
    definition comparable with the reference study's value (0.036).
    """
    return float((kxx.mean() + kyy.mean() - 2.0 * kxy.mean()) / n_voxels)


def squared_distances(
    kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared Euclidean distances d²=K_ii+K_jj-2K_ij (within real, within synthetic, cross)."""
    dx, dy = np.diag(kxx), np.diag(kyy)
    d_xx = np.maximum(dx[:, None] + dx[None, :] - 2.0 * kxx, 0.0)
    d_yy = np.maximum(dy[:, None] + dy[None, :] - 2.0 * kyy, 0.0)
    d_xy = np.maximum(dx[:, None] + dy[None, :] - 2.0 * kxy, 0.0)
    return d_xx, d_yy, d_xy


def median_heuristic(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """σ² for the Gaussian kernel: median of the squared distances over all pairs i<j of the pooled set."""
    d_xx, d_yy, d_xy = squared_distances(kxx, kyy, kxy)
    pooled = np.block([[d_xx, d_xy], [d_xy.T, d_yy]])
    iu = np.triu_indices(len(pooled), k=1)
    return float(np.median(pooled[iu]))


def gaussian_grams(
    kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, sigma2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-kernel Gram blocks exp(-d² / (2σ²)) derived from the linear Gram blocks."""
    if not sigma2 > 0:
        raise ValueError(f"Gaussian bandwidth must be > 0, got {sigma2}")
    return tuple(np.exp(-d / (2.0 * sigma2)) for d in squared_distances(kxx, kyy, kxy))


def mmd_all(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, n_voxels: int,
            sigma2: float | None = None) -> dict[str, float]:
    """The three MMD variants (plus the per-voxel linear one) from the same Gram matrices."""
    sigma2 = median_heuristic(kxx, kyy, kxy) if sigma2 is None else sigma2
    lin = mmd_unbiased(kxx, kyy, kxy)
    return {
        "mmd_linear_unbiased": lin,
        "mmd_linear_unbiased_per_voxel": lin / n_voxels,
        "mmd_monai_generative": mmd_monai_generative(kxx, kyy, kxy, n_voxels),
        "mmd_gaussian_unbiased": mmd_unbiased(*gaussian_grams(kxx, kyy, kxy, sigma2)),
    }


# --------------------------------------------------------------------------- FID

def fid_trace_sqrt(a_centred: np.ndarray, b_centred: np.ndarray) -> float:
    """Tr sqrtm(Σ_A Σ_B) = ||A Bᵀ||_* / sqrt((n-1)(m-1)) for centred feature matrices A (n×F), B (m×F)."""
    n, m = len(a_centred), len(b_centred)
    s = np.linalg.svd(a_centred @ b_centred.T, compute_uv=False)
    return float(s.sum() / np.sqrt((n - 1) * (m - 1)))


def fid(features_real: np.ndarray, features_syn: np.ndarray, method: str = "nuclear") -> float:
    """Fréchet distance ||μ_r-μ_s||² + Tr Σ_r + Tr Σ_s - 2 Tr sqrtm(Σ_r Σ_s) of feature vectors (n, F).

    ``method="nuclear"`` (default) is exact even when n < F (rank-deficient covariances);
    ``method="sqrtm"`` uses scipy's matrix square root, as MONAI's FIDMetric does.
    """
    a = np.asarray(features_real, dtype=np.float64)
    b = np.asarray(features_syn, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, F) with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two feature vectors per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    tr_a = (ac * ac).sum() / (len(a) - 1)
    tr_b = (bc * bc).sum() / (len(b) - 1)
    if method == "nuclear":
        tr_ab = fid_trace_sqrt(ac, bc)
    elif method == "sqrtm":
        cov_a = ac.T @ ac / (len(a) - 1)
        cov_b = bc.T @ bc / (len(b) - 1)
        tr_ab = float(np.real(np.trace(scipy.linalg.sqrtm(cov_a @ cov_b))))
    else:
        raise ValueError(f"unknown FID method {method!r} (nuclear or sqrtm)")
    return float(((mu_a - mu_b) ** 2).sum() + tr_a + tr_b - 2.0 * tr_ab)


# --------------------------------------------------------------------------- MS-SSIM

def msssim_weights(scales: int) -> tuple[float, ...]:
    """MONAI's default MS-SSIM weights truncated to ``scales`` and renormalised to sum 1."""
    if not 1 <= scales <= len(MONAI_MSSSIM_WEIGHTS):
        raise ValueError(f"scales must be 1..{len(MONAI_MSSSIM_WEIGHTS)}, got {scales}")
    w = np.asarray(MONAI_MSSSIM_WEIGHTS[:scales], dtype=np.float64)
    return tuple(float(v) for v in w / w.sum())


def pairwise_msssim(volumes: np.ndarray, kernel_size: int = 5, scales: int = 5, data_range: float = 1.0,
                    batch_pairs: int = 16, device: str | torch.device = "cpu") -> np.ndarray:
    """Symmetric (n, n) matrix of 3D MS-SSIM between all pairs of one set; diagonal = 1.

    Uses ``monai.metrics.MultiScaleSSIMMetric`` (Gaussian kernel σ=1.5, MONAI weights truncated
    to ``scales``); ``batch_pairs`` pairs are evaluated per call.  MS-SSIM is symmetric, so only
    pairs i<j are computed.
    """
    vol = np.asarray(volumes)
    if vol.ndim != 5 or vol.shape[1] != 1:
        raise ValueError(f"volumes must be (N, 1, D, H, W), got {vol.shape}")
    small = min(vol.shape[2:])
    if small < msssim_min_size(kernel_size, scales):
        raise ValueError(f"volume edge {small} too small for MS-SSIM with kernel {kernel_size} and "
                         f"{scales} scales (need >= {msssim_min_size(kernel_size, scales)})")
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel_size,
                                  weights=msssim_weights(scales), reduction="none")
    n = len(vol)
    out = np.eye(n)
    ii, jj = np.triu_indices(n, k=1)
    t = torch.as_tensor(vol, dtype=torch.float32, device=device)
    with torch.no_grad():
        for s in range(0, len(ii), batch_pairs):
            i, j = ii[s : s + batch_pairs], jj[s : s + batch_pairs]
            vals = metric(y_pred=t[i], y=t[j]).reshape(-1).double().cpu().numpy()
            metric.reset()
            out[i, j] = vals
            out[j, i] = vals
    return out


def brain_bbox(volume_sets: Sequence[np.ndarray], min_size: int = 0) -> tuple[slice, slice, slice]:
    """One bounding box (3 slices) of the union of non-zero voxels over all given (N,1,D,H,W) sets.

    Each edge shorter than ``min_size`` is grown symmetrically (shifted inside the volume at the borders).
    """
    shape = np.asarray(volume_sets[0]).shape[2:]
    nonzero = np.zeros(shape, dtype=bool)
    for v in volume_sets:
        v = np.asarray(v)
        if v.shape[2:] != shape:
            raise ValueError(f"volume shapes differ: {v.shape[2:]} vs {shape}")
        nonzero |= (v[:, 0] != 0).any(axis=0)
    if not nonzero.any():
        raise ValueError("all volumes are empty (no non-zero voxel)")
    box = []
    for axis, size in enumerate(shape):
        idx = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if min_size > size:
            raise ValueError(f"volume edge {size} is smaller than the minimum box size {min_size}")
        grow = max(0, min_size - (hi - lo))
        lo -= grow // 2
        hi += grow - grow // 2
        shift = max(0, -lo) - max(0, hi - size)
        box.append(slice(lo + shift, hi + shift))
    return tuple(box)


def crop(volumes: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Crop (N,1,D,H,W) volumes to a box from :func:`brain_bbox`."""
    return np.ascontiguousarray(np.asarray(volumes)[(slice(None), slice(None)) + tuple(box)])


def mean_offdiag(matrix: np.ndarray) -> float:
    """Mean of the off-diagonal entries (mean pairwise MS-SSIM of a set)."""
    n = len(matrix)
    return float((matrix.sum() - np.trace(matrix)) / (n * (n - 1)))


# --------------------------------------------------------------------------- reference floor

def real_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, sorted index halves of range(n) (sizes n//2 and n-n//2), fixed by ``seed``."""
    if n < 4:
        raise ValueError(f"need at least 4 real volumes to split into halves, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


# --------------------------------------------------------------------------- memorization

def brain_mask(training, indices: np.ndarray | None = None, chunk: int = 32) -> np.ndarray:
    """Union of non-zero voxels over the training volumes (array-like (N,1,D,H,W)), read in chunks."""
    idx = np.arange(len(training)) if indices is None else np.asarray(indices)
    mask = None
    for s in range(0, len(idx), chunk):
        part = (np.asarray(training[idx[s : s + chunk]])[:, 0] != 0).any(axis=0)
        mask = part if mask is None else (mask | part)
    return mask


def _standardised(volumes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows z with z·z' = Pearson correlation inside the mask (constant volumes give 0)."""
    x = np.asarray(volumes)[:, 0][:, mask].astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def max_correlation(query_sets: Sequence[np.ndarray], training, mask: np.ndarray, indices: np.ndarray,
                    chunk: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each volume of each query set: max Pearson correlation (inside ``mask``) with the training
    volumes ``training[indices]`` and the training index reaching it.  One pass over the training
    set, read ``chunk`` volumes at a time; returns one (max_corr, train_index) pair per query set."""
    q = np.vstack([_standardised(v, mask) for v in query_sets])
    best = np.full(len(q), -np.inf)
    arg = np.zeros(len(q), dtype=np.int64)
    for s in range(0, len(indices), chunk):
        idx = indices[s : s + chunk]
        corr = q @ _standardised(training[idx], mask).T
        j = corr.argmax(axis=1)
        c = corr[np.arange(len(q)), j]
        better = c > best
        best[better], arg[better] = c[better], idx[j[better]]
    bounds = np.cumsum([0] + [len(v) for v in query_sets])
    return [(best[a:b], arg[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def memorization(synthetic: np.ndarray, validation: np.ndarray, training, percentile: float = 95.0,
                 max_train: int | None = None, seed: int = 0, chunk: int = 32) -> dict:
    """Nearest-training-neighbour correlation of synthetic and real validation volumes.

    ``training`` is any array-like indexable by sorted index arrays (ndarray, memmap, h5py
    dataset).  With ``max_train`` a random subset (fixed by ``seed``) is used.  The threshold
    is the ``percentile`` of the validation set's max correlations; synthetic volumes above it
    are flagged.  Returned indices into ``training`` refer to the full training array.
    """
    n_train = len(training)
    indices = np.arange(n_train)
    if max_train is not None and max_train < n_train:
        indices = np.sort(np.random.default_rng(seed).choice(n_train, max_train, replace=False))
    mask = brain_mask(training, indices, chunk)
    if not mask.any():
        raise ValueError("the training volumes are empty: no brain mask")
    (syn_corr, syn_arg), (val_corr, val_arg) = max_correlation([synthetic, validation], training,
                                                                mask, indices, chunk)
    threshold = float(np.percentile(val_corr, percentile))
    order = np.argsort(-syn_corr, kind="stable")
    flagged = order[syn_corr[order] > threshold]
    return {
        "synthetic_max_corr": syn_corr, "synthetic_nearest_train": syn_arg,
        "validation_max_corr": val_corr, "validation_nearest_train": val_arg,
        "threshold": threshold, "percentile": float(percentile),
        "flagged": flagged,
        "closest_pairs": np.stack([order, syn_arg[order]], axis=1),  # (synthetic, training), best first
        "closest_corr": syn_corr[order],
        "train_indices": indices, "mask_voxels": int(mask.sum()),
    }
