"""Nearest-neighbour distances -> patch scores: plain, or weighted by the matched memory entry.

``PlainScorer``: the distance to the nearest entry (PatchCore, AnomalyDINO), squared when the
detector's ``distance`` is ``squared`` (the PatchCore and SoftPatch reference code score with
faiss ``IndexFlatL2``, i.e. squared L2, and blur/upsample those values). ``WeightedScorer``:
that score times the soft weight of the matched entry (SoftPatch; the weight rule is
``softpatch.matched_weight``, continuous at near-ties, which needs ``k`` neighbours).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class PlainScorer:
    """Patch score = distance to the nearest memory entry (squared if ``squared``)."""

    k = 1

    def __init__(self, squared: bool = False):
        self.squared = squared

    def scale(self, dists: np.ndarray) -> np.ndarray:
        return np.square(dists) if self.squared else dists

    def __call__(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """[Q, k] distances and bank indices -> [Q] patch scores."""
        return self.scale(dists)[:, 0]


class WeightedScorer(PlainScorer):
    """Patch score = (scaled) nearest distance x ``weight_rule(d^2 [Q, k], idx, weights)`` [Q]."""

    def __init__(self, weights: np.ndarray, weight_rule: Callable, k: int, squared: bool = False):
        super().__init__(squared)
        self.weights, self.weight_rule, self.k = weights, weight_rule, k

    def __call__(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # The weight multiplies the score on the ``distance`` scale: d^2 by default, exactly as the
        # SoftPatch reference (`image_scores * weight`, faiss IndexFlatL2 outputs); d with euclidean.
        scaled = self.scale(dists)
        d2 = scaled if self.squared else np.square(dists)
        w = self.weight_rule(torch.from_numpy(np.ascontiguousarray(d2, dtype=np.float32)), torch.from_numpy(idx),
                             torch.from_numpy(self.weights)).numpy()
        return (scaled[:, 0] * w).astype(np.float32)
