"""Image scores from patch scores: the rules a patch-kNN detector's ``aggregation`` names.

``max`` is PatchCore's (paper Sec. 3.3 and the reference code's ``np.max`` over the patch
scores); ``topk_mean`` AnomalyDINO's (``mean_top1p``); ``blurred_max`` the max of the anomaly
map the detector returns (upsampled to the model input and Gaussian-blurred), which smooths a
single outlying patch away before the max. PatchCore's eq. 7 reweighting of the max is
``PatchCore.reweighted_scores`` (it needs the memory bank).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Aggregation = Literal["max", "mean", "topk_mean", "blurred_max"]


def aggregate(patch_scores: np.ndarray, how: Aggregation = "max", topk_ratio: float = 0.01, topk: int | None = None,
              maps: list[np.ndarray] | np.ndarray | None = None) -> np.ndarray:
    """Image scores [B] from patch scores [B, ...]: max, mean, mean of the top patches, or max of the map.

    ``topk_mean`` averages the ``topk`` highest patch scores, or (``topk`` None) the top
    ``max(1, int(n_patches * topk_ratio))`` (AnomalyDINO: top 1%, truncated as its reference
    ``mean_top1p``, which falls back to the max below 100 patches). ``blurred_max`` is the maximum
    of each image's anomaly map ``maps`` (upsampled and blurred), not of the raw patch grid.
    """
    flat = np.asarray(patch_scores, dtype=np.float32).reshape(len(patch_scores), -1)
    if how == "max":
        return flat.max(axis=1)
    if how == "mean":
        return flat.mean(axis=1)
    if how == "topk_mean":
        k = max(1, int(flat.shape[1] * topk_ratio)) if topk is None else int(topk)
        if not 1 <= k <= flat.shape[1]:
            raise ValueError(f"topk={k} must be between 1 and the {flat.shape[1]} patches of an image")
        return -np.sort(-flat, axis=1)[:, :k].mean(axis=1)
    if how == "blurred_max":
        if maps is None or len(maps) != len(flat):
            raise ValueError("aggregation blurred_max needs one anomaly map per image")
        return np.array([float(np.max(m)) for m in maps], dtype=np.float32)
    raise ValueError(f"aggregation must be one of max, mean, topk_mean, blurred_max; got {how!r}")


def describe_rule(how: Aggregation, topk_ratio: float, topk: int | None, blur_sigma: float) -> str:
    """One line for the report's protocol."""
    rule = {"max": "max of the patch scores", "mean": "mean of the patch scores",
            "topk_mean": (f"mean of the top {topk} patch scores" if topk is not None
                          else f"mean of the top {topk_ratio:g} share of patch scores (at least 1)"),
            "blurred_max": f"max of the anomaly map (upsampled, Gaussian sigma {blur_sigma:g})"}[how]
    return f"aggregation {how}: {rule}"
