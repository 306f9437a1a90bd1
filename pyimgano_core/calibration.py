"""Decision thresholds from held-out normal images.

The memory bank's own images score ~0 (each patch finds itself), so thresholds set on them
flag everything; thresholds set on the test set leak labels. We hold out a seeded share of the
normal training images, keep them out of the memory bank, and take quantiles of their scores.
"""
from __future__ import annotations

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

    def to_dict(self) -> dict:
        return asdict(self)


def quantile_threshold(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile of normal values (linear interpolation, numpy's default)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no calibration values")
    return float(np.quantile(values, q))


def fit_thresholds(scores: np.ndarray, maps: list[np.ndarray] | None, image_q: float, pixel_q: float) -> Thresholds:
    """Image threshold from held-out image scores; pixel threshold from all their map pixels."""
    pixel = median = None
    if maps:
        values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
        pixel, median = quantile_threshold(values, pixel_q), float(np.median(values))
    return Thresholds(quantile_threshold(scores, image_q), pixel, image_q, pixel_q, int(len(scores)), median)
