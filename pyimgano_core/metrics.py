"""Exact anomaly-detection metrics: image and pixel AUROC/AP, AUPRO, F1.

Every curve metric is evaluated at *every distinct score* (no threshold grid), with
ties handled like scikit-learn (``roc_auc_score``, ``average_precision_score``) and
AUPRO following the MVTec AD evaluation code (Bergmann et al.). Plain numpy/scipy:
scikit-learn is deliberately not imported, because its OpenMP runtime clashes with
torch's inside one process.

All curves are built from the tie groups that contain at least one positive: the
scores of all samples are sorted once, and "how many samples score >= t" is a binary
search in them, so only positives (defect pixels) are ever tracked individually. Pixel
metrics are computed in float32 (maps are cast once), so distinct float64 values that
round to the same float32 count as one threshold.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from pyimgano_core.errors import DataError


class MetricInputError(DataError, ValueError):
    """Labels, scores or maps a metric cannot be computed on (e.g. only one class).

    A ``ValueError`` for callers of this module, and a ``DataError`` so the CLI reports
    it as a one-line user error rather than a crash.
    """


STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity, as in MVTec's evaluation


class Groups(NamedTuple):
    """The tie groups (distinct thresholds) that contain at least one positive.

    Only these matter: between them TP, precision's numerator and PRO are constant, so
    ROC/PR/PRO curves are straight (or flat) there and every integral can be written
    over these groups alone. ``*0`` = counts before the group, ``*1`` = through it.
    """

    value: np.ndarray  # the group's score, descending
    t0: np.ndarray  # positives scoring > value
    t1: np.ndarray  # positives scoring >= value
    c0: np.ndarray  # samples scoring > value
    c1: np.ndarray  # samples scoring >= value
    n_pos: int
    n_neg: int


def _positive_groups(ascending: np.ndarray, positives: np.ndarray) -> Groups:
    """Group ``positives`` (descending) by score; count all samples via ``ascending``.

    Only positives need to be identified: how many samples in total beat a score is a
    binary search in the sorted scores of all samples.
    """
    starts = np.flatnonzero(np.append(True, positives[1:] != positives[:-1]))
    value = positives[starts]
    n = ascending.size
    return Groups(value=value, t0=starts, t1=np.append(starts[1:], positives.size),
                   c0=n - np.searchsorted(ascending, value, side="right"),
                   c1=n - np.searchsorted(ascending, value, side="left"),
                   n_pos=positives.size, n_neg=n - positives.size)


def _require_normals(g: Groups, what: str) -> None:
    if g.n_neg == 0:
        raise MetricInputError(f"{what}: only anomalous samples present; the metric "
                               "needs both normal and anomalous samples")


def _auroc(g: Groups) -> float:
    # Trapezoids over distinct thresholds, a mixed tie group being a diagonal (half
    # credit), as sklearn. Computed as 1 - the area above the curve, which only groups
    # adding true positives contribute to: dTP * (FP0 + FP1) / 2. The integer dot
    # product is exact (it stays far below int64 range for < 4e9 samples).
    gap = np.dot(g.t1 - g.t0, (g.c0 - g.t0) + (g.c1 - g.t1)) / 2.0
    return float(1.0 - gap / (g.n_pos * g.n_neg))


def _ap(g: Groups) -> float:
    # Step-wise sum of (R_n - R_{n-1}) * P_n, no interpolation (sklearn's definition).
    return float(np.dot(g.t1 - g.t0, g.t1 / g.c1) / g.n_pos)


def _image_groups(labels, scores, what: str) -> Groups:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricInputError(f"{what}: labels ({y.size}) and scores ({s.size}) "
                               "differ in length")
    if not np.isfinite(s).all():
        raise MetricInputError(f"{what}: scores contain NaN or infinite values")
    if not y.any():
        raise MetricInputError(f"{what}: only normal samples present; the metric "
                               "needs at least one anomalous sample")
    return _positive_groups(np.sort(s), np.sort(s[y])[::-1])


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image-level scores (higher = more anomalous).

    Parameters
    ----------
    labels : array_like of bool-like
        Nonzero / True for anomalous images.
    scores : array_like of float
        Anomaly score per image.

    Raises
    ------
    ValueError
        If only one class is present, lengths differ or scores are not finite.
    """
    g = _image_groups(labels, scores, "image_auroc")
    _require_normals(g, "image_auroc")
    return _auroc(g)


def image_ap(labels, scores) -> float:
    """Average precision of image-level scores (sklearn's step-wise definition).

    Parameters and errors as :func:`image_auroc`.
    """
    g = _image_groups(labels, scores, "image_ap")
    _require_normals(g, "image_ap")
    return _ap(g)


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` (oracle threshold, exact).

    Returns
    -------
    best_f1 : float
    threshold : float
        The score value ``t`` achieving it; the highest one if several tie.

    Raises
    ------
    ValueError
        If there is no anomalous label (F1 would be 0/0 at every threshold).
    """
    g = _image_groups(labels, scores, "f1_max")
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual positives); it can only
    # peak at the end of a group that adds a true positive.
    f1 = 2.0 * g.t1 / (g.c1 + g.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(g.value[best])


def binary_stats(labels, predictions) -> dict:
    """Confusion counts and scores of thresholded decisions.

    Works on image-level vectors or pixel masks of any (matching) shape. Every ratio
    whose denominator is zero is reported as 0.0 (e.g. precision with no predicted
    positives), so the dict is always finite.

    Returns
    -------
    dict
        ``precision, recall, f1, iou`` (floats) and ``tp, fp, fn, tn`` (ints).
    """
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predictions).astype(bool)
    if y.shape != p.shape:
        raise MetricInputError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    tp = int(np.count_nonzero(y & p))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(y)) - tp
    return stats_from_counts(tp, fp, fn, y.size - tp - fp - fn)


def stats_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict:
    """:func:`binary_stats` from confusion counts (e.g. summed over images one at a time)."""

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    return dict(precision=ratio(tp, tp + fp), recall=ratio(tp, tp + fn),
                f1=ratio(2 * tp, 2 * tp + fp + fn), iou=ratio(tp, tp + fp + fn),
                tp=tp, fp=fp, fn=fn, tn=tn)


def _gather(masks: Sequence, maps: Sequence):
    """All pixel scores as one float32 array; defect pixels' scores and region ids."""
    if len(masks) != len(maps):
        raise MetricInputError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    if len(maps) == 0:
        raise MetricInputError("no anomaly maps given")
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if np.shape(mask) != np.shape(amap) or np.ndim(amap) != 2:
            raise MetricInputError(f"image {i}: mask shape {np.shape(mask)} does not match "
                                   f"anomaly map shape {np.shape(amap)} (both must be HxW)")
    scores = np.empty(sum(np.size(m) for m in maps), dtype=np.float32)
    defect_scores, defect_regions = [], []
    start, n_regions = 0, 0
    for mask, amap in zip(masks, maps):
        chunk = scores[start:start + np.size(amap)]
        chunk.reshape(np.shape(amap))[...] = amap  # casts to float32 without a temporary
        if not np.isfinite(chunk).all():
            raise MetricInputError("anomaly maps contain NaN or infinite values")
        regions, n = ndimage.label(np.asarray(mask).astype(bool), structure=STRUCTURE)
        inside = regions > 0
        defect_scores.append(chunk.reshape(regions.shape)[inside])
        defect_regions.append(regions[inside] + (n_regions - 1))  # global, 0-based
        n_regions += n
        start += chunk.size
    return scores, np.concatenate(defect_scores), np.concatenate(defect_regions)


def pixel_metrics(masks: Sequence, maps: Sequence, fpr_limit: float = 0.3) -> dict:
    """Pixel AUROC, pixel AP and AUPRO from a single global sort of all pixels.

    Parameters
    ----------
    masks : sequence of (H, W) bool-like arrays
        Ground truth per image (nonzero = defect); sizes may differ between images.
    maps : sequence of (H, W) float arrays
        Anomaly map per image, same shape as its mask.
    fpr_limit : float
        Upper FPR bound of the AUPRO integral, in (0, 1].

    Returns
    -------
    dict
        ``pixel_auroc``, ``pixel_ap`` and ``aupro``. AUPRO uses the 8-connected regions
        of each mask; FPR(t) is over all background pixels, PRO(t) the mean over all
        regions of their fraction of pixels scoring >= t. The curve runs from (0, 0) to
        (1, 1) and is integrated with trapezoids up to ``fpr_limit`` (PRO linearly
        interpolated there), then divided by ``fpr_limit``.

    Raises
    ------
    ValueError
        On a mask/map shape mismatch (naming the image), non-finite maps, or masks
        with no defect region or no background pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, defect_scores, regions = _gather(masks, maps)
    if regions.size == 0:
        raise MetricInputError("pixel metrics: masks contain no defect region")
    if regions.size == scores.size:
        raise MetricInputError("pixel metrics: masks contain no background pixel")
    scores.sort()  # the one global sort
    order = np.argsort(defect_scores)[::-1]  # defect pixels only, typically a few %
    g = _positive_groups(scores, defect_scores[order])
    del scores
    return pixel_curves(g, regions[order], fpr_limit)


def pixel_curves(g: Groups, regions_desc: np.ndarray, fpr_limit: float) -> dict:
    """Pixel AUROC, AP and AUPRO from the defect-pixel groups and the defect pixels' region ids,
    ordered like the groups (descending score)."""
    # PRO weight of a defect pixel = 1 / (region size * number of regions), so PRO at a
    # threshold is the cumulative weight of the defect pixels scoring >= it.
    sizes = np.bincount(regions_desc)
    k = len(g.t0)
    pro_at = _cumulative_at(1.0 / (sizes * sizes.size), regions_desc, np.concatenate((g.t0, g.t1, [g.n_pos])))

    # PRO curve: each group is a segment from its "> value" to its ">= value" point;
    # between groups PRO is flat, which the trapezoids joining them reproduce.
    fpr = np.column_stack((g.c0 - g.t0, g.c1 - g.t1)).ravel() / g.n_neg
    pro = np.column_stack((pro_at[:k], pro_at[k : 2 * k])).ravel()
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [pro_at[-1]]))
    return dict(pixel_auroc=_auroc(g), pixel_ap=_ap(g),
                aupro=_integrate_to(fpr, pro, fpr_limit) / fpr_limit)


def _cumulative_at(weight: np.ndarray, ids: np.ndarray, at: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """``cumsum(weight[ids])`` (with a leading 0) read at positions ``at``, in chunks of ``ids``.

    The same float64 additions in the same order as the whole cumsum, without its two
    8-byte-per-defect-pixel arrays (the bounded-memory metrics need that at 1 G pixels).
    """
    order = np.argsort(at, kind="stable")
    pos, out = at[order], np.empty(len(at))
    carry, k = 0.0, 0
    for s in range(0, len(ids) + 1, chunk):
        part = np.cumsum(np.concatenate(([carry], weight[ids[s : s + chunk]])))  # part[t - s] = value at t
        hi = int(np.searchsorted(pos, s + len(part) - 1, side="right"))
        out[order[k:hi]] = part[pos[k:hi] - s]
        carry, k = float(part[-1]), hi
    return out


def _integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) on [0, limit], interpolating y linearly at ``limit``."""
    inside = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:inside], y[:inside]
    if inside < x.size:  # x[inside - 1] <= limit < x[inside]
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.dot(np.diff(xs), ys[1:] + ys[:-1]) / 2.0)


def pixel_auroc(masks: Sequence, maps: Sequence) -> float:
    """Pixel-level AUROC over all pixels of all images; see :func:`pixel_metrics`."""
    return pixel_metrics(masks, maps)["pixel_auroc"]


def pixel_ap(masks: Sequence, maps: Sequence) -> float:
    """Pixel-level average precision; see :func:`pixel_metrics`."""
    return pixel_metrics(masks, maps)["pixel_ap"]


def aupro(masks: Sequence, maps: Sequence, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; see :func:`pixel_metrics`."""
    return pixel_metrics(masks, maps, fpr_limit)["aupro"]
