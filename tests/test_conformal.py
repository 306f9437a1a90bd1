"""Conformal image thresholds: the order statistic, its stated guarantee, the small-holdout warning."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pyimgano_core.calibration import conformal_threshold, fit_thresholds


@pytest.mark.parametrize("n,alpha,k", [(99, 0.01, 99), (199, 0.05, 190), (19, 0.1, 18), (9, 0.5, 5)])
def test_rank_is_ceil_n_plus_1_times_coverage(n, alpha, k):
    scores = np.random.default_rng(0).permutation(n).astype(float)  # the k-th smallest is k - 1
    thr, rank, expected, upper, warning = conformal_threshold(scores, alpha)
    assert rank == k == math.ceil((n + 1) * (1 - alpha) - 1e-9) and thr == k - 1 and warning is None
    assert expected == pytest.approx((n + 1 - k) / (n + 1)) and expected <= alpha + 1e-12
    assert expected < upper < 1


def test_false_alarm_rate_holds_on_new_normal_scores():
    """Monte Carlo: over many holdouts, new normal scores are flagged at (n+1-k)/(n+1) <= alpha."""
    rng = np.random.default_rng(1)
    n, alpha, reps = 19, 0.1, 4000
    cal = rng.standard_normal((reps, n))
    new = rng.standard_normal(reps)
    flagged = [new[i] >= conformal_threshold(cal[i], alpha)[0] for i in range(reps)]
    # exact rate 2/20 = 0.1; 4000 draws: standard error ~0.0047
    assert abs(np.mean(flagged) - 0.1) < 0.02
    # a plain 0.9 quantile (interpolated) flags more often than asked on such a small holdout
    plain = [new[i] >= np.quantile(cal[i], 0.9) for i in range(reps)]
    assert np.mean(plain) > np.mean(flagged)


def test_holdout_too_small_for_the_quantile_warns_and_reports_the_achievable_rate():
    scores = np.linspace(0, 1, 21)  # bottle: 209 train images * 0.1 -> 21 held out
    t = fit_thresholds(scores, None, image_q=0.99, pixel_q=0.999)
    assert t.method == "conformal" and t.image == 1.0 and t.image_rank == 21
    assert t.expected_fpr == pytest.approx(1 / 22)
    assert "21 image(s)" in t.warning and "at least 99 normal images" in t.warning
    assert fit_thresholds(np.linspace(0, 1, 99), None, 0.99, 0.999).warning is None
