"""The shared patch-kNN helpers against hand-computed answers and brute force (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pyimgano_core.detectors.patchknn import aggregate, make_index, greedy_coreset, to_grid, upsample


# ------------------------------------------------------------------------------ aggregate
def test_aggregate_max_mean_topk_by_hand():
    patch = np.array([[[1.0, 9.0], [3.0, 5.0]], [[0.0, 0.0], [0.0, 4.0]]])  # (B=2, 2, 2)
    np.testing.assert_allclose(aggregate(patch, "max"), [9.0, 4.0])
    np.testing.assert_allclose(aggregate(patch, "mean"), [4.5, 1.0])
    np.testing.assert_allclose(aggregate(patch, "topk_mean", topk_ratio=0.5), [7.0, 2.0])  # top 2 of 4
    np.testing.assert_allclose(aggregate(patch, "topk_mean", topk_ratio=0.75), [17 / 3, 4 / 3])  # top 3 of 4


def reference_mean_top1p(distances: np.ndarray) -> float:
    """AnomalyDINO's mean_top1p (src/post_eval.py), step by step."""
    n = int(len(distances) * 0.01)
    if n == 0:
        return float(np.max(distances))
    return float(np.mean(sorted(distances.flatten(), reverse=True)[:n]))


def test_aggregate_topk_count_truncates_as_the_reference_and_keeps_at_least_one():
    scores = np.arange(1000, dtype=np.float32)[None]  # one image, 1000 patches
    assert aggregate(scores, "topk_mean", 0.01)[0] == pytest.approx(np.mean(np.arange(990, 1000)))  # 10 patches
    assert aggregate(scores[:, :199], "topk_mean", 0.01)[0] == 198.0  # int(1.99) = 1
    assert aggregate(scores[:, :200], "topk_mean", 0.01)[0] == pytest.approx(198.5)  # int(2.0) = 2
    assert aggregate(scores[:, :10], "topk_mean", 0.01)[0] == 9.0  # at least one patch
    rng = np.random.default_rng(0)
    for n in (10, 99, 100, 150, 1080, 1536):  # 1080: int(10.8) = 10 where round() would take 11
        d = rng.random(n).astype(np.float32)
        assert aggregate(d[None], "topk_mean", 0.01)[0] == pytest.approx(reference_mean_top1p(d), rel=1e-6)
    with pytest.raises(ValueError, match="max, mean, topk_mean"):
        aggregate(scores, "median")


# ------------------------------------------------------------------------------ to_grid
def test_to_grid_is_row_major_per_image():
    grid = to_grid(np.arange(12), batch=2, grid_hw=(2, 3))
    assert grid.shape == (2, 2, 3)
    assert grid[1].tolist() == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("flat", [np.arange(11), np.arange(13), np.arange(12).reshape(2, 6)])
def test_to_grid_rejects_wrong_sizes(flat):
    with pytest.raises(ValueError, match=r"expected 2\*2\*3=12 patch values"):
        to_grid(flat, batch=2, grid_hw=(2, 3))


# ------------------------------------------------------------------------------ upsample
def test_upsample_constant_grid_stays_constant():
    out = upsample(np.full((2, 3, 5), 0.7, np.float32), (12, 20), sigma=4.0)
    assert out.shape == (2, 12, 20) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_upsample_bilinear_half_pixel_centres_by_hand():
    # 2x2 -> 4x4: output centres sit at input coordinates -0.25, 0.25, 0.75, 1.25 (clamped),
    # so the weight of the bottom-right input pixel along each axis is 0, 1/4, 3/4, 1.
    grid = np.array([[[0.0, 0.0], [0.0, 1.0]]], np.float32)
    a = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(upsample(grid, (4, 4), sigma=0)[0], np.outer(a, a), atol=1e-6)


def test_upsample_blur_matches_scipy_reflect_on_an_impulse():
    grid = np.zeros((1, 5, 5), np.float32)
    grid[0, 1, 3] = 1.0  # off-centre impulse: the reflected border matters
    sharp = upsample(grid, (40, 40), sigma=0)[0]
    out = upsample(grid, (40, 40), sigma=2.0)[0]
    ref = gaussian_filter(sharp.astype(np.float64), sigma=2.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # the impulse's centre (row 1, col 3) maps to pixel centre (11.5, 27.5): the peak stays there
    assert np.unravel_index(out.argmax(), out.shape) in {(11, 27), (11, 28), (12, 27), (12, 28)}


# ------------------------------------------------------------------------------ greedy coreset
CLUSTER = [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1)]  # indices 0-3
FAR = {"A": (50.0, 0.0), "B": (0.0, 100.0), "D": (-200.0, 0.0)}  # indices 4, 5, 6
POINTS = np.array(CLUSTER + list(FAR.values()), np.float32)
A, B, D = 4, 5, 6


@pytest.mark.parametrize("seed", range(8))
def test_greedy_coreset_picks_the_farthest_points(seed):
    picks = greedy_coreset(POINTS, 4, proj_dim=128, seed=seed)  # D=2 < 128: no projection
    assert len(set(picks.tolist())) == 4
    assert {A, B, D} <= set(picks.tolist())  # the three outliers, whatever the start
    if picks[0] < 4:
        # From a cluster start: farthest is D (200), then B (min distance 100), then A (50).
        assert picks[1:].tolist() == [D, B, A]
    np.testing.assert_array_equal(picks, greedy_coreset(POINTS, 4, proj_dim=128, seed=seed))


def test_greedy_coreset_with_projection_and_clamping():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.01, size=(200, 300)).astype(np.float32)
    x[[17, 123]] += 5.0 * rng.normal(size=(2, 300)).astype(np.float32)  # two outliers
    picks = greedy_coreset(x, 3, proj_dim=32, seed=1)  # 300 -> 32 dims random projection
    assert {17, 123} <= set(picks.tolist())
    assert sorted(greedy_coreset(x[:5], 10, seed=0).tolist()) == [0, 1, 2, 3, 4]  # n > N: all, once


# ------------------------------------------------------------------------------ kNN search
def _brute(bank, queries, k, metric):
    if metric == "l2":
        d = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    else:
        bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = 1.0 - qn @ bn.T
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_index_matches_brute_force(metric, backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss not installed (extra 'faiss')")
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(60, 8)).astype(np.float64)
    queries = rng.normal(size=(25, 8)).astype(np.float64)
    queries[0] = bank[7] * (1.0 if metric == "l2" else 3.0)  # an exact hit: distance 0
    dists, idx = make_index({"kind": ("flat" if backend == "faiss" else "exact")}, metric).fit(bank).search(queries, k=3, **({"chunk": 7} if backend == "torch" else {}))  # several chunks
    ref_d, ref_i = _brute(bank, queries, 3, metric)
    assert dists.shape == idx.shape == (25, 3)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dists[1:], ref_d[1:], atol=2e-5)
    np.testing.assert_allclose(dists[0, 1:], ref_d[0, 1:], atol=2e-5)
    # At distance ~0 the float32 expansion |q|^2 - 2 q.m + |m|^2 cancels: the L2 error is
    # ~sqrt(eps32) * |q| (here ~1e-3), the cosine error ~eps32.
    assert abs(dists[0, 0]) < (3e-3 if metric == "l2" else 2e-6)
