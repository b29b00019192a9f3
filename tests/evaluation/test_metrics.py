"""Metric functions against hand computations, MONAI, and independent numpy/scipy calculations."""

import math

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from monai.metrics import FIDMetric, MMDMetric
from monai.metrics.regression import compute_ms_ssim

from brainddpm.evaluation import metrics as M

SHAPE = (16, 20, 16)


def vols(rows) -> np.ndarray:
    """Tiny 'volumes' (N, 1, 1, 1, V) from a list of vectors."""
    a = np.asarray(rows, dtype=np.float32)
    return a.reshape(len(a), 1, 1, 1, -1)


def brains(n, seed, shape=SHAPE, radius=0.8, smooth=True):
    """Random smooth volumes in [0, 1] inside an ellipsoid, background exactly 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < radius**2
    x = rng.random((n, 1, *shape))
    if smooth:
        x = (x + np.roll(x, 1, -1) + np.roll(x, 1, -2) + np.roll(x, 1, -3)) / 4
    return (x * inside).astype(np.float32)


# --------------------------------------------------------------------------- MMD

def test_mmd_hand_computed_equal_means():
    # X = {(1,0),(0,1)}, Y = {(1,1),(0,0)}: within-set off-diagonal products are 0, the four
    # cross products sum to 2 -> unbiased = 0 + 0 - 2*2/4 = -1; the means are equal -> biased 0.
    k = M.gram_matrices(vols([[1, 0], [0, 1]]), vols([[1, 1], [0, 0]]))
    assert M.mmd_unbiased(*k) == pytest.approx(-1.0)
    assert M.mmd_monai_generative(*k, n_voxels=2) == pytest.approx(0.0)


def test_mmd_hand_computed_different_means():
    # X = {(2,0),(0,0)}, Y = {(0,1),(0,1)}: Kxx=[[4,0],[0,0]], Kyy=[[1,1],[1,1]], Kxy=0.
    # unbiased = 0/2 + 2/2 - 0 = 1; generative = (mean Kxx 1 + mean Kyy 1)/V=2 = 1 = |(1,0)-(0,1)|²/2.
    k = M.gram_matrices(vols([[2, 0], [0, 0]]), vols([[0, 1], [0, 1]]))
    assert M.mmd_unbiased(*k) == pytest.approx(1.0)
    assert M.mmd_monai_generative(*k, n_voxels=2) == pytest.approx(1.0)


def test_gram_matrices_chunked_float64():
    x, y = brains(5, 0), brains(4, 1)
    fx, fy = x.reshape(5, -1).astype(np.float64), y.reshape(4, -1).astype(np.float64)
    for chunk in (1000, 4096, 10**6):
        kxx, kyy, kxy = M.gram_matrices(x, y, chunk_voxels=chunk)
        assert kxx.dtype == np.float64
        np.testing.assert_allclose(kxx, fx @ fx.T, rtol=1e-12)
        np.testing.assert_allclose(kyy, fy @ fy.T, rtol=1e-12)
        np.testing.assert_allclose(kxy, fx @ fy.T, rtol=1e-12)


def test_mmd_linear_matches_monai_core_and_generative_matches_mean_images():
    x, y = brains(6, 2), brains(6, 3) * 0.8
    k = M.gram_matrices(x, y)
    monai = MMDMetric()(torch.from_numpy(x).double(), torch.from_numpy(y).double()).item()
    assert M.mmd_unbiased(*k) == pytest.approx(monai, rel=1e-9)
    v = x[0].size
    diff = x.astype(np.float64).mean(0) - y.astype(np.float64).mean(0)
    assert M.mmd_monai_generative(*k, n_voxels=v) == pytest.approx((diff**2).sum() / v, rel=1e-9)
    res = M.mmd_all(*k, n_voxels=v)
    assert res["mmd_linear_unbiased_per_voxel"] == pytest.approx(monai / v, rel=1e-9)


def test_gaussian_mmd_hand_computed():
    # 1-D points X={0,1}, Y={2,4}; pooled squared distances 1,1,4,4,9,16 -> median σ²=4, k=exp(-d²/8)
    k = M.gram_matrices(vols([[0], [1]]), vols([[2], [4]]))
    assert M.median_heuristic(*k) == pytest.approx(4.0)
    e = lambda d2: math.exp(-d2 / 8)  # noqa: E731
    expected = e(1) + e(4) - 2 * (e(4) + e(16) + e(1) + e(9)) / 4
    assert M.mmd_all(*k, n_voxels=1)["mmd_gaussian_unbiased"] == pytest.approx(expected)


def test_median_heuristic_matches_scipy_pdist():
    x, y = brains(5, 4), brains(7, 5)
    pooled = np.concatenate([x, y]).reshape(12, -1).astype(np.float64)
    expected = np.median(scipy.spatial.distance.pdist(pooled, "sqeuclidean"))
    assert M.median_heuristic(*M.gram_matrices(x, y)) == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- FID

def test_fid_hand_computed_1d():
    # X=[0,2]: mean 1, var 2; Y=[1,5]: mean 3, var 8 -> (1-3)² + (√2-√8)² = 4 + 2 = 6
    for method in ("nuclear", "sqrtm"):
        assert M.fid(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]]), method) == pytest.approx(6.0)


def test_fid_nuclear_equals_sqrtm_and_monai():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    nuclear, sqrtm = M.fid(a, b, "nuclear"), M.fid(a, b, "sqrtm")
    monai = FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)).item()
    assert nuclear == pytest.approx(sqrtm, rel=1e-8)
    assert nuclear == pytest.approx(monai, rel=1e-8)
    assert nuclear > 0.1


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 5))
    assert abs(M.fid(a, a, "sqrtm")) < 1e-8
    wide = rng.normal(size=(12, 64))  # n < F: rank-deficient covariance, the nuclear form stays exact
    assert abs(M.fid(wide, wide)) < 1e-8
    assert M.fid(wide, wide + 1.0) == pytest.approx(64.0)


# --------------------------------------------------------------------------- MS-SSIM

def test_msssim_weights_and_min_size():
    w5 = np.array(M.msssim_weights(5))
    assert w5.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w5 / w5[0], np.array(M.MONAI_MSSSIM_WEIGHTS) / 0.0448)
    w2 = M.msssim_weights(2)
    assert w2 == pytest.approx((0.0448 / 0.3304, 0.2856 / 0.3304))
    assert M.msssim_min_size(5, 5) == 80  # 84x128x84 fits kernel 5 with 5 scales
    assert M.msssim_min_size(11, 5) > 84  # MONAI's default kernel 11 does not


@pytest.mark.parametrize("kernel,scales", [(3, 2), (3, 3), (3, 4)])
def test_min_size_is_the_smallest_size_monai_accepts(kernel, scales):
    size = M.msssim_min_size(kernel, scales)
    w = M.msssim_weights(scales)
    x = torch.rand(1, 1, size, size, size)
    assert torch.isfinite(compute_ms_ssim(x, x, 3, kernel_size=kernel, weights=w)).all()
    y = torch.rand(1, 1, size - 1, size - 1, size - 1)
    with pytest.raises((ValueError, RuntimeError)):
        compute_ms_ssim(y, y, 3, kernel_size=kernel, weights=w)


def test_pairwise_msssim_identity_noise_and_batching():
    base = brains(1, 6)[0]
    rng = np.random.default_rng(7)
    noisy = lambda s: np.clip(base + s * rng.normal(size=base.shape), 0, 1) * (base > 0)  # noqa: E731
    v = np.stack([base, base.copy(), noisy(0.05), noisy(0.3)]).astype(np.float32)
    s = M.pairwise_msssim(v, kernel_size=3, scales=2, batch_pairs=4)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), 1.0)
    assert s[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > s[0, 2] > s[0, 3]
    one_by_one = M.pairwise_msssim(v, kernel_size=3, scales=2, batch_pairs=1)
    np.testing.assert_allclose(s, one_by_one, rtol=1e-6)
    direct = compute_ms_ssim(torch.from_numpy(v[2:3]), torch.from_numpy(v[3:4]), 3, kernel_size=3,
                             weights=M.msssim_weights(2)).item()
    assert s[2, 3] == pytest.approx(direct, rel=1e-6)


def test_pairwise_msssim_rejects_too_small_volumes():
    with pytest.raises(ValueError, match="too small"):
        M.pairwise_msssim(brains(2, 0), kernel_size=5, scales=5)


def test_brain_bbox_union_padding_and_borders():
    a = np.zeros((2, 1, *SHAPE), np.float32)
    b = np.zeros((1, 1, *SHAPE), np.float32)
    a[0, 0, 5, 6, 7] = 1
    b[0, 0, 9, 12, 8] = 0.5
    assert M.brain_bbox([a, b]) == (slice(5, 10), slice(6, 13), slice(7, 9))
    box = M.brain_bbox([a, b], min_size=6)  # edges 5, 7, 2 -> 6, 7, 6 grown symmetrically
    assert box == (slice(5, 11), slice(6, 13), slice(5, 11))
    c = np.zeros((1, 1, *SHAPE), np.float32)
    c[0, 0, 0, 19, 15] = 1  # at the far corner: the grown box is shifted inside the volume
    assert M.brain_bbox([c], min_size=4) == (slice(0, 4), slice(16, 20), slice(12, 16))
    assert M.crop(a, box).shape == (2, 1, 6, 7, 6)
    with pytest.raises(ValueError):
        M.brain_bbox([c], min_size=17)


def test_bbox_removes_background_inflation():
    # Two sets of unrelated noise brains in a small central region of a large empty volume:
    # whole-volume MS-SSIM is dominated by the shared zero background, the box is not.
    v = brains(4, 8, shape=(24, 24, 24), radius=0.35, smooth=False)
    full = M.mean_offdiag(M.pairwise_msssim(v, kernel_size=3, scales=2))
    box = M.brain_bbox([v], min_size=M.msssim_min_size(3, 2))
    cropped = M.mean_offdiag(M.pairwise_msssim(M.crop(v, box), kernel_size=3, scales=2))
    assert full > cropped + 0.2


def test_mean_offdiag_hand():
    s = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert M.mean_offdiag(s) == pytest.approx(0.4)


def test_real_halves_deterministic_disjoint():
    a, b = M.real_halves(11, seed=3)
    assert len(a) == 5 and len(b) == 6
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(11))
    a2, b2 = M.real_halves(11, seed=3)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, M.real_halves(11, seed=4)[0])


# --------------------------------------------------------------------------- memorization

def test_memorization_flags_copies_and_matches_corrcoef():
    train = brains(9, 10)
    val = brains(8, 11)
    rng = np.random.default_rng(12)
    syn = brains(5, 13)
    syn[1] = train[6] + 0.01 * rng.random(train[6].shape).astype(np.float32) * (train[6] > 0)
    syn[3] = train[2]
    res = M.memorization(syn, val, train, percentile=95, chunk=2)
    mask = (train[:, 0] != 0).any(0)
    assert res["mask_voxels"] == mask.sum()
    expected = np.array([[np.corrcoef(s[0][mask], t[0][mask])[0, 1] for t in train] for s in syn])
    np.testing.assert_allclose(res["synthetic_max_corr"], expected.max(1), rtol=1e-10)
    np.testing.assert_array_equal(res["synthetic_nearest_train"], expected.argmax(1))
    expected_val = np.array([[np.corrcoef(s[0][mask], t[0][mask])[0, 1] for t in train] for s in val])
    assert res["threshold"] == pytest.approx(np.percentile(expected_val.max(1), 95))
    assert set(res["flagged"]) == {1, 3}
    assert res["closest_pairs"][0].tolist() == [3, 2] and res["closest_pairs"][1].tolist() == [1, 6]
    unchunked = M.memorization(syn, val, train, chunk=100)
    np.testing.assert_allclose(unchunked["synthetic_max_corr"], res["synthetic_max_corr"], rtol=1e-12)


def test_memorization_max_train_uses_a_subset_with_original_indices():
    train = brains(10, 14)
    syn = np.stack([train[i] for i in range(10)])
    res = M.memorization(syn, brains(4, 15), train, max_train=4, seed=0)
    used = res["train_indices"]
    assert len(used) == 4
    np.testing.assert_array_equal(np.flatnonzero(res["synthetic_max_corr"] > 1 - 1e-9), used)
    np.testing.assert_array_equal(res["synthetic_nearest_train"][used], used)
