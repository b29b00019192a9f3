"""Bootstrap over precomputed matrices: point estimates, resample correctness, chunking, intervals."""

import numpy as np
import pytest

from brainddpm.evaluation import bootstrap as B
from brainddpm.evaluation import metrics as M


def gaussian_sets(n, m, d=40, shift=0.0, seed=0):
    """Two sets of flattened 'volumes' (N, 1, 1, 1, d)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 1, 1, d))
    y = rng.normal(size=(m, 1, 1, 1, d)) + shift
    return x, y


def similarity(n, seed):
    """A symmetric similarity matrix with unit diagonal (stands in for pairwise MS-SSIM)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 30)) + rng.normal(size=30)  # shared component -> positive similarities
    return np.corrcoef(z)


def make_inputs(n=12, m=10, shift=0.5, d=40, features=True, seed=0):
    x, y = gaussian_sets(n, m, d, shift, seed)
    rng = np.random.default_rng(seed + 100)
    fr = rng.normal(size=(n, 6))
    fs = rng.normal(size=(m, 6)) + 0.5
    return B.prepare_inputs(*M.gram_matrices(x, y), d, similarity(n, seed + 1), similarity(m, seed + 2),
                            similarity(n, seed + 3), similarity(m, seed + 4),
                            fr if features else None, fs if features else None, halves_seed=seed), x, y, fr, fs


def test_point_estimates_match_metric_functions():
    inputs, x, y, fr, fs = make_inputs()
    p = B.point_estimates(inputs)
    k = M.gram_matrices(x, y)
    for name, value in M.mmd_all(*k, n_voxels=40).items():
        assert p[name] == pytest.approx(value, rel=1e-10, abs=1e-12)
    assert p["fid"] == pytest.approx(M.fid(fr, fs), rel=1e-10)
    assert p["msssim_real"] == pytest.approx(M.mean_offdiag(inputs["msssim_real"]))
    assert p["msssim_synthetic_bbox"] == pytest.approx(M.mean_offdiag(inputs["msssim_syn_bbox"]))
    a, b = inputs["half_a"], inputs["half_b"]
    kf = M.gram_matrices(x[a], x[b])
    floor = M.mmd_all(*kf, n_voxels=40, sigma2=float(inputs["sigma2"]))
    for name, value in floor.items():
        assert p[f"floor_{name}"] == pytest.approx(value, rel=1e-10, abs=1e-12)
    assert p["floor_fid"] == pytest.approx(M.fid(fr[a], fr[b]), rel=1e-10)
    no_feat = B.point_estimates(make_inputs(features=False)[0])
    assert "fid" not in no_feat and "floor_fid" not in no_feat


def _distinct_pair_mean(k, idx):
    """Brute force: mean of k over ordered position pairs p != q whose originals differ."""
    vals = [k[idx[p], idx[q]] for p in range(len(idx)) for q in range(len(idx)) if idx[p] != idx[q]]
    return np.mean(vals)


def test_resample_equals_brute_force_on_the_drawn_indices():
    inputs, x, y, fr, fs = make_inputs()
    seed, b = 5, 3
    got = {k: v[0] for k, v in B.resample_chunk(inputs, b, b + 1, seed).items()}
    rng = np.random.default_rng([seed, b])  # draw order documented in brainddpm.evaluation.bootstrap
    ix, iy = rng.integers(0, 12, 12), rng.integers(0, 10, 10)
    kxx, kyy, kxy = M.gram_matrices(x, y)
    cross = kxy[np.ix_(ix, iy)].mean()
    unbiased = _distinct_pair_mean(kxx, ix) + _distinct_pair_mean(kyy, iy) - 2 * cross
    assert got["mmd_linear_unbiased"] == pytest.approx(unbiased, rel=1e-10)
    full_x = np.mean(kxx[ix, ix]) / 12 + 11 / 12 * _distinct_pair_mean(kxx, ix)
    full_y = np.mean(kyy[iy, iy]) / 10 + 9 / 10 * _distinct_pair_mean(kyy, iy)
    assert got["mmd_monai_generative"] == pytest.approx((full_x + full_y - 2 * cross) / 40, rel=1e-10)
    gxx, gyy, gxy = M.gaussian_grams(kxx, kyy, kxy, float(inputs["sigma2"]))
    gauss = _distinct_pair_mean(gxx, ix) + _distinct_pair_mean(gyy, iy) - 2 * gxy[np.ix_(ix, iy)].mean()
    assert got["mmd_gaussian_unbiased"] == pytest.approx(gauss, rel=1e-10)
    assert got["fid"] == pytest.approx(M.fid(fr[ix], fs[iy]), rel=1e-9)
    assert got["msssim_real"] == pytest.approx(_distinct_pair_mean(inputs["msssim_real"], ix))
    assert got["msssim_synthetic"] == pytest.approx(_distinct_pair_mean(inputs["msssim_syn"], iy))


def test_identical_results_for_one_or_four_chunks(tmp_path):
    inputs = make_inputs()[0]
    B.save_npz(tmp_path / "inputs", inputs)  # exact path, no .npz appended
    loaded = B.load_npz(tmp_path / "inputs")
    one = [B.resample_chunk(loaded, 0, 60, seed=11)]
    four = []
    for k, (start, stop) in enumerate(B.chunk_bounds(60, 4)):
        B.save_npz(tmp_path / f"c{k}", B.resample_chunk(loaded, start, stop, seed=11))
        four.append(B.load_npz(tmp_path / f"c{k}"))
    for name in one[0]:
        np.testing.assert_array_equal(one[0][name], np.concatenate([c[name] for c in four]))
    point = B.point_estimates(loaded)
    assert B.gather(point, one) == B.gather(point, four[::-1])
    other_seed = B.resample_chunk(loaded, 0, 60, seed=12)
    assert not np.array_equal(other_seed["mmd_linear_unbiased"], one[0]["mmd_linear_unbiased"])


def test_interval_contains_point_and_narrows_with_n():
    names = ["mmd_linear_unbiased", "mmd_monai_generative", "mmd_gaussian_unbiased", "msssim_real",
             "msssim_synthetic", "fid"]
    widths = {}
    for n in (15, 60):
        inputs = make_inputs(n=n, m=n, shift=0.4, seed=n)[0]
        res = B.gather(B.point_estimates(inputs), [B.resample_chunk(inputs, 0, 200, seed=1)])
        for name in names:
            r = res[name]
            if name != "fid":  # FID's interval may lie above its point estimate (see FID_CAVEAT)
                assert r["ci_low"] <= r["value"] <= r["ci_high"], (name, n, r)
            assert r["n_boot"] == 200
            widths[name, n] = r["ci_high"] - r["ci_low"]
    for name in names:
        assert widths[name, 60] < 0.75 * widths[name, 15], name


def _naive_unbiased_mmd(kxx, kyy, kxy, ix, iy):
    """Resampled MMD that only drops the positional diagonal (keeps copies paired with themselves)."""
    a, b = kxx[np.ix_(ix, ix)], kyy[np.ix_(iy, iy)]
    n, m = len(ix), len(iy)
    return ((a.sum() - np.trace(a)) / (n * (n - 1)) + (b.sum() - np.trace(b)) / (m * (m - 1))
            - 2 * kxy[np.ix_(ix, iy)].mean())


def test_same_distribution_interval_contains_zero_only_with_duplicate_correction():
    x, y = gaussian_sets(25, 25, d=300, shift=0.0, seed=3)
    k = M.gram_matrices(x, y)
    inputs = B.prepare_inputs(*k, 300, similarity(25, 1), similarity(25, 2))
    res = B.gather(B.point_estimates(inputs), [B.resample_chunk(inputs, 0, 300, seed=2)])
    for name in ("mmd_linear_unbiased", "mmd_gaussian_unbiased", "floor_mmd_linear_unbiased",
                 "floor_mmd_gaussian_unbiased"):
        assert res[name]["ci_low"] < 0 < res[name]["ci_high"], (name, res[name])
    rng = np.random.default_rng(0)
    naive = [_naive_unbiased_mmd(*k, rng.integers(0, 25, 25), rng.integers(0, 25, 25)) for _ in range(300)]
    assert np.percentile(naive, 2.5) > 0  # without the correction the interval excludes 0


def test_gather_refuses_missing_or_repeated_chunks_and_counts_finite():
    inputs = make_inputs()[0]
    point = B.point_estimates(inputs)
    c1, c2 = B.resample_chunk(inputs, 0, 5, 0), B.resample_chunk(inputs, 5, 10, 0)
    with pytest.raises(ValueError, match="cover"):
        B.gather(point, [c2])
    with pytest.raises(ValueError, match="cover"):
        B.gather(point, [c1, c2, c2])
    del c2["fid"]
    with pytest.raises(ValueError, match="fid"):
        B.gather(point, [c1, c2])
    c2 = B.resample_chunk(inputs, 5, 10, 0)
    c2["msssim_real"][0] = np.nan  # e.g. a resample with a single distinct volume
    res = B.gather(point, [c1, c2], level=0.9)
    assert res["msssim_real"]["n_boot"] == 9 and res["fid"]["n_boot"] == 10
    finite = np.concatenate([c1["msssim_real"], c2["msssim_real"][1:]])
    assert res["msssim_real"]["ci_low"] == pytest.approx(np.percentile(finite, 5))


def test_chunk_bounds_cover_all_resamples():
    for n_boot, jobs in ((1000, 4), (10, 3), (3, 8)):
        bounds = B.chunk_bounds(n_boot, jobs)
        assert bounds[0][0] == 0 and bounds[-1][1] == n_boot
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(stop > start for start, stop in bounds)
