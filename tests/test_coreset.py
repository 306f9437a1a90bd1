"""Batched lazy greedy k-center against a plain reference loop: identical picks, ties included."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyimgano_core.detectors.patchknn import greedy as coreset
from pyimgano_core.detectors.patchknn.greedy import greedy_coreset, kcenter

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOTTLE = SHARED / "data/mvtec_ad/bottle/train/good"
WEIGHTS = SHARED / "weights/mobilenet_v2-b0353104.pth"


def plain_greedy(x: np.ndarray, n: int, first: int) -> list[int]:
    """Textbook greedy k-center (Gonzalez 1985): every pick updates every point, float64."""
    x = np.asarray(x, dtype=np.float64)
    d = np.full(len(x), np.inf)
    picks, idx = [], first
    for _ in range(n):
        picks.append(idx)
        d = np.minimum(d, ((x - x[idx]) ** 2).sum(1))
        idx = int(np.argmax(d))  # ties: lowest index
    return picks


@pytest.fixture(params=["default", "small"])
def sizes(request, monkeypatch):
    """The module's pool / batch / block sizes, and small ones that make every path run often
    (pool exhausted, batch full, several row blocks) on test-sized data."""
    if request.param == "small":
        monkeypatch.setattr(coreset, "_POOL", 64)
        monkeypatch.setattr(coreset, "_BATCH", 16)
        monkeypatch.setattr(coreset, "_BLOCK", 700)
    return request.param


def test_identical_to_plain_loop_with_ties_and_duplicates(sizes):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 4, (1500, 6)).astype(np.float32)  # integer points: exact distances, many ties
    x = np.concatenate([grid, grid[::3], grid[:50]])  # exact duplicates, after and among the originals
    picks, stats = kcenter(x, 1200, first=7)  # past the ~1000 distinct points: then all remaining are ties at 0
    assert picks.tolist() == plain_greedy(x, 1200, 7)
    assert 0 < stats["exact_fraction"] < 1


def test_identical_to_plain_loop_on_clustered_floats(sizes):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((40, 24)) * 5
    x = (centers[rng.integers(0, 40, 6000)] + rng.standard_normal((6000, 24)) * rng.uniform(0.1, 1, (6000, 1)))
    x = x.astype(np.float32)
    picks, stats = kcenter(x, 900, first=123)
    assert picks.tolist() == plain_greedy(x, 900, 123)
    assert stats["exact_fraction"] < 0.1  # the float32 screen settles most (point, pick) pairs
    assert stats["batches"] < 900 / (16 if sizes == "small" else 512) * 3  # picks do come in batches


def test_greedy_coreset_is_seeded_projection_then_plain_greedy(sizes):
    rng = np.random.default_rng(2)
    f = rng.standard_normal((3000, 64)).astype(np.float32)
    seed = 5
    r = np.random.default_rng(seed)  # the documented draws: projection matrix, then the first pick
    proj = (r.standard_normal((64, 16)) / np.sqrt(16)).astype(np.float32)
    first = int(r.integers(3000))
    picks = greedy_coreset(f, 300, proj_dim=16, seed=seed)
    assert picks.tolist() == plain_greedy(f @ proj, 300, first)
    rows = np.arange(0, 3000, 2)  # candidates restricted to some rows: positions within them
    sub = greedy_coreset(f, 100, proj_dim=16, seed=seed, rows=rows)
    r = np.random.default_rng(seed)
    proj = (r.standard_normal((64, 16)) / np.sqrt(16)).astype(np.float32)
    assert sub.tolist() == plain_greedy(f[rows] @ proj, 100, int(r.integers(len(rows))))


def test_chunked_coreset_is_exact_greedy_over_the_chunks_overpicks():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((5000, 8)).astype(np.float32)
    f[3333:] *= 3  # a more spread-out last third: the union's greedy gives it more than its share
    stats: dict = {}
    picks = greedy_coreset(f, 500, proj_dim=0, seed=1, method="chunked", chunk_points=2000, stats=stats)
    assert stats["coreset_chunks"] == 3 and len(picks) == 500 and len(set(picks.tolist())) == 500
    r = np.random.default_rng(1)
    r.integers(5000)  # the unused whole-set first pick keeps the exact method's stream
    # blocks of 5000 // (8 * 3) = 208 rows dealt round-robin: chunk c holds blocks c, c + 3, c + 6, ...
    members = [np.flatnonzero((np.arange(5000) // 208) % 3 == c) for c in range(3)]
    assert [len(m) for m in members] == [8 * 208 + 8, 8 * 208, 8 * 208] and all(m[0] // 208 == c for c, m in enumerate(members))
    union = []
    for m in members:  # twice each chunk's share: ceil(2 * 500 * size / 5000)
        union += [m[i] for i in plain_greedy(f[m], -(-1000 * len(m) // 5000), int(r.integers(len(m))))]
    union = np.array(union)
    expected = union[plain_greedy(f[union], 500, int(r.integers(len(union))))]
    assert picks.tolist() == expected.tolist()
    assert (picks >= 3333).sum() > 500 / 3 + 50
    # rows= restricts the candidates: the same partition over positions in rows
    rows = np.arange(0, 10000, 2)
    wide = np.zeros((10000, 8), np.float32)
    wide[rows] = f
    np.testing.assert_array_equal(greedy_coreset(wide, 500, 0, 1, method="chunked", chunk_points=2000, rows=rows), picks)
    # one chunk = the exact method
    np.testing.assert_array_equal(greedy_coreset(f, 50, 0, 1, method="chunked", chunk_points=10_000),
                                  greedy_coreset(f, 50, 0, 1))


@pytest.mark.realdata
@pytest.mark.skipif(not (BOTTLE.is_dir() and WEIGHTS.is_file()), reason="../shared (bottle + MobileNetV2) not present")
def test_identical_to_plain_loop_on_real_bottle_features():
    import torch

    from pyimgano_core.detectors.patchcore import PatchCore

    torch.set_num_threads(1)
    det = PatchCore(backbone="mobilenet_v2", layers=["features.6", "features.13"], weights=str(WEIGHTS),
                    image_size=224, crop=None)
    det.params_ = det.Params.model_validate(det.params)
    paths = sorted(BOTTLE.glob("*.png"))[:8]  # 8 images x 784 patches, 1024-d: the README config's features
    feats = np.concatenate([f for f, _ in det._embed(paths, {})]).reshape(-1, 1024)
    r = np.random.default_rng(0)
    proj = (r.standard_normal((1024, 128)) / np.sqrt(128)).astype(np.float32)
    x = feats @ proj
    first = int(r.integers(len(x)))
    n = len(x) // 10
    picks, stats = kcenter(x, n, first)
    assert picks.tolist() == plain_greedy(x, n, first)
    assert stats["exact_fraction"] < 0.05
