"""Decision thresholds from held-out normal images.

The memory bank's own images score ~0 (each patch finds itself), so thresholds set on them
flag everything; thresholds set on the test set leak labels. We hold out a seeded share of the
normal training images and keep them out of the memory bank.

Image threshold (split conformal; Vovk et al. 2005, Angelopoulos & Bates 2021, "A Gentle
Introduction to Conformal Prediction", Sec. 1 and Appendix D): with ``n`` held-out scores and
a wanted false-alarm rate ``alpha = 1 - image_quantile``, the threshold is the ``k``-th
smallest held-out score, ``k = ceil((n + 1)(1 - alpha))``. If a new good part's score is
exchangeable with the held-out ones (same line, same conditions) and scores have no ties, it
is flagged with probability exactly ``(n + 1 - k) / (n + 1) <= alpha``. That rate averages
over holdout draws; for the one holdout we drew, the false-alarm rate is Beta(n + 1 - k, k)
distributed (ibid., Appendix C), and we report its 95% upper bound too. No threshold can
promise less than ``1 / (n + 1)``: when ``k > n`` we take the largest held-out score, report
the rate it achieves and warn.

Pixel threshold: the ``pixel_quantile`` of all held-out map pixels (pixels of one image are
not exchangeable, so no guarantee is claimed for it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .data.types import Sample


def split_holdout(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(fit, holdout): a seeded random ``fraction`` of the training images, at least one."""
    n_hold = int(round(fraction * len(train)))
    n_hold = min(max(n_hold, 1), len(train) - 1)
    order = np.random.default_rng(seed).permutation(len(train))
    hold = set(order[:n_hold].tolist())
    return [s for i, s in enumerate(train) if i not in hold], [s for i, s in enumerate(train) if i in hold]


@dataclass
class Thresholds:
    image: float
    pixel: float | None
    image_quantile: float
    pixel_quantile: float
    n_images: int
    pixel_median: float | None = None  # median held-out map value: lower end of the display range
    method: str = "quantile"  # "conformal" for models fitted since the conformal rule (older: plain quantile)
    image_rank: int | None = None  # k: the threshold is the k-th smallest held-out score
    expected_fpr: float | None = None  # (n + 1 - k) / (n + 1): false-alarm rate on new good parts
    fpr_upper_95: float | None = None  # 95% upper bound of that rate for this holdout (Beta)
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def quantile_threshold(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile of normal values (linear interpolation, numpy's default)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no calibration values")
    return float(np.quantile(values, q))


def conformal_threshold(scores: np.ndarray, alpha: float) -> tuple[float, int, float, float, str | None]:
    """(threshold, k, expected false-alarm rate, its 95% upper bound, warning or None)."""
    from scipy.stats import beta

    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    if n == 0:
        raise ValueError("no calibration values")
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)  # tolerance: (n+1)(1-alpha) may be an integer in floating point
    warning = None
    if k > n:
        k = n
        warning = (f"calibration holdout has {n} image(s): no threshold can promise a false-alarm rate of {alpha:.3g} "
                   f"(the best is 1/(n+1) = {1 / (n + 1):.3g}); "
                   + (f"hold out at least {math.ceil(1 / alpha - 1 - 1e-9)} normal images (calibration.holdout_fraction) or " if alpha > 0 else "")
                   + "lower calibration.image_quantile")
    k = max(k, 1)
    expected = (n + 1 - k) / (n + 1)
    return float(s[k - 1]), k, expected, float(beta.ppf(0.95, n + 1 - k, k)), warning


def fit_thresholds(scores: np.ndarray, maps: list[np.ndarray] | None, image_q: float, pixel_q: float) -> Thresholds:
    """Image threshold: conformal order statistic of held-out scores; pixel: quantile of their map pixels."""
    pixel = median = None
    if maps:
        values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
        pixel, median = quantile_threshold(values, pixel_q), float(np.median(values))
    image, k, expected, upper, warning = conformal_threshold(scores, 1 - image_q)
    return Thresholds(image, pixel, image_q, pixel_q, int(len(scores)), median, "conformal", k, expected, upper, warning)
