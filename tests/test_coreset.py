"""Greedy k-center coreset against a plain reference, across the thread-probe blocks."""
from __future__ import annotations

import numpy as np

from pyimgano_core.detectors.patchknn import greedy_coreset


def test_greedy_coreset_matches_plain_reference_over_several_blocks():
    f = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    picks = greedy_coreset(f, 2500, proj_dim=0, seed=5)  # the block probes both 1 and 2 BLAS threads
    idx = int(np.random.default_rng(5).integers(len(f)))
    d = np.full(len(f), np.inf)
    ref = []
    for _ in range(2500):
        ref.append(idx)
        d = np.minimum(d, ((f.astype(np.float64) - f[idx]) ** 2).sum(1))
        idx = int(d.argmax())
    # float32 vs float64 distances may break an exact tie differently very late; the first
    # picks (the ones that matter) must agree exactly, and picks never repeat
    assert picks[:500].tolist() == ref[:500]
    assert len(set(picks.tolist())) == len(picks)
    np.testing.assert_array_equal(picks, greedy_coreset(f, 2500, proj_dim=0, seed=5))
