"""ROC, PR and PRO curves for reports: exact points, downsampled to a few hundred.

Image curves are exact at every distinct score. Pixel curves come from a streaming
histogram over a fixed, data-independent grid of float32 thresholds (the top 20 bits
of each value's order-preserving bit pattern: a relative step of 2^-11, about 0.05%),
so memory does not depend on the number of images and no second pass is needed. Every
stored point is the exact (FPR, TPR) / (recall, precision) / (FPR, PRO) at its stated
threshold ``score >= t``; only the choice of thresholds is coarser than "every distinct
value". The headline metrics (AUROC, AP, AUPRO) come from :mod:`pyimgano_core.metrics`,
not from these curves.

PRO follows the MVTec AD evaluation (Bergmann et al., IJCV 2021, Sec. 5.2 / the MVTec
``generic_util.compute_pro``): 8-connected ground-truth regions, PRO(t) = mean over all
regions of the fraction of their pixels scoring >= t, against the FPR over all
defect-free pixels, integrated to ``fpr_limit``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

SHIFT = 12  # drop 12 of 32 bits -> 2^20 threshold bins
NBINS = 1 << (32 - SHIFT)
N_POINTS = 300  # points stored per curve
PRO_GRID = 2000  # thresholds at which PRO is evaluated below the FPR limit
_STRUCTURE = np.ones((3, 3), dtype=bool)


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving bin index of float32 values: ``a <= b`` implies ``key(a) <= key(b)``."""
    x = np.asarray(values, dtype=np.float32).ravel() + np.float32(0.0)  # -0.0 -> +0.0 (they compare equal)
    bits = x.view(np.uint32)
    ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    return (ordered >> SHIFT).astype(np.intp)


def key_threshold(keys: np.ndarray) -> np.ndarray:
    """The smallest float32 in each bin: ``x >= key_threshold(k)`` exactly when ``float_keys(x) >= k``."""
    ordered = np.asarray(keys, dtype=np.uint32) << np.uint32(SHIFT)
    bits = np.where(ordered >> 31, ordered ^ np.uint32(0x80000000), ~ordered)
    return bits.view(np.float32).astype(np.float64)


def downsample(*axes: np.ndarray, n: int = N_POINTS) -> np.ndarray:
    """Indices of about ``n`` points evenly spaced along the curve's length, both ends kept."""
    length = axes[0].size
    if length <= n:
        return np.arange(length)
    steps = np.sqrt(sum(np.diff(np.asarray(a, np.float64)) ** 2 for a in axes))
    arc = np.concatenate(([0.0], np.cumsum(steps)))
    picks = np.searchsorted(arc, np.linspace(0.0, arc[-1], n))
    return np.unique(np.concatenate(([0], np.clip(picks, 0, length - 1), [length - 1])))


def _rounded(values, idx) -> list:
    return [None if v is None else round(float(v), 6) for v in (np.asarray(values, dtype=object)[idx])]


def _curve(names: tuple[str, ...], arrays: tuple[np.ndarray, ...], thresholds, idx) -> dict:
    out = {name: _rounded(a, idx) for name, a in zip(names, arrays)}
    out["threshold"] = [None if t is None or not np.isfinite(t) else float(t) for t in np.asarray(thresholds, dtype=object)[idx]]
    return out


def _roc_pr(tp: np.ndarray, fp: np.ndarray, thr: np.ndarray, n_pos: int, n_neg: int) -> dict:
    """Curves from counts of positives/negatives scoring >= each threshold (descending)."""
    fpr = np.concatenate(([0.0], fp / n_neg))
    tpr = np.concatenate(([0.0], tp / n_pos))
    t = np.concatenate(([np.inf], thr))  # the origin: above every score
    roc = _curve(("fpr", "tpr"), (fpr, tpr), t, downsample(fpr, tpr))
    precision, recall = tp / np.maximum(tp + fp, 1), tp / n_pos
    pr = _curve(("recall", "precision"), (recall, precision), thr, downsample(recall, precision))
    return {"roc": roc, "pr": pr}


def image_curves(labels, scores) -> dict | None:
    """Exact image-level ROC and PR curves (every distinct score), or None with one class."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # end of each tie group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return _roc_pr(tp, fp, s[last], n_pos, y.size - n_pos)


class PixelCurves:
    """Streaming pixel curves: ``add(mask, amap)`` per image, then :meth:`finish`."""

    def __init__(self, fpr_limit: float = 0.3):
        self.fpr_limit = fpr_limit
        self.total = np.zeros(NBINS, np.int64)
        self.pos = np.zeros(NBINS, np.int64)
        self.regions: list[tuple[np.ndarray, np.ndarray]] = []  # per image: region sizes, sorted (region << 21 | key)
        self.owners: list[int] = []  # image id of each entry in ``regions``
        self.lo, self.hi = np.inf, -np.inf

    def add(self, mask: np.ndarray, amap: np.ndarray, owner: int) -> None:
        keys = float_keys(amap)
        self.total += np.bincount(keys, minlength=NBINS)
        self.lo, self.hi = min(self.lo, float(amap.min())), max(self.hi, float(amap.max()))
        inside = np.asarray(mask, bool).ravel()
        if not inside.any():
            return
        self.pos += np.bincount(keys[inside], minlength=NBINS)
        labels, n = ndimage.label(np.asarray(mask, bool), structure=_STRUCTURE)
        lab = labels.ravel()[inside].astype(np.int64) - 1
        packed = np.sort((lab << 21) | keys[inside])
        self.regions.append((np.bincount(lab, minlength=n), packed))
        self.owners.append(owner)

    def _pro(self, sizes: np.ndarray, packed: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """(regions, thresholds) fraction of each region's pixels with key >= each grid key."""
        r = np.arange(sizes.size, dtype=np.int64)[:, None]
        below = np.searchsorted(packed, (r << 21) | grid[None, :]) - np.searchsorted(packed, r << 21)
        return 1.0 - below / sizes[:, None]

    def finish(self) -> tuple[dict | None, dict[int, float]]:
        """(curves, per-image AUPRO) where curves = {roc, pr, pro}; None without both classes.

        Per-image AUPRO: the PRO curve of that image's regions alone, against the FPR of
        *all* defect-free pixels (the global operating points), integrated to ``fpr_limit``
        and normalised by it. The pooled AUPRO is the region-weighted mean of these curves.
        """
        neg = self.total - self.pos
        n_pos, n_neg = int(self.pos.sum()), int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            return None, {}
        present = np.flatnonzero(self.total)[::-1]  # occupied bins, highest threshold first
        tp, fp = np.cumsum(self.pos[present]), np.cumsum(neg[present])
        curves = _roc_pr(tp, fp, key_threshold(present), n_pos, n_neg)

        fpr = fp / n_neg
        within = int(np.searchsorted(fpr, self.fpr_limit, side="right"))
        end = min(within + 1, present.size)  # one point past the limit, for interpolation
        picks = np.unique(np.concatenate((np.searchsorted(fpr[:within], np.linspace(0, self.fpr_limit, PRO_GRID)),
                                          np.arange(within, end))))
        picks = picks[picks < end]
        grid, gfpr = present[picks].astype(np.int64), fpr[picks]
        x = np.concatenate(([0.0], gfpr))
        per_region = [np.vstack((np.zeros(s.size), self._pro(s, p, grid).T)).T for s, p in self.regions]
        pooled = np.concatenate(per_region).mean(axis=0)
        per_image = {o: _area_to(x, pro.mean(axis=0), self.fpr_limit) / self.fpr_limit
                     for o, pro in zip(self.owners, per_region)}
        keep = x <= self.fpr_limit
        px, py = x[keep], pooled[keep]
        if px[-1] < self.fpr_limit and keep.size > px.size:  # exact endpoint at the limit (linear, as metrics.py)
            px, py = np.append(px, self.fpr_limit), np.append(py, np.interp(self.fpr_limit, x, pooled))
        t = np.concatenate(([np.inf], key_threshold(grid)))[: px.size]
        if t.size < px.size:
            t = np.append(t, np.nan)
        curves["pro"] = _curve(("fpr", "pro"), (px, py), t, downsample(px / self.fpr_limit, py))
        curves["pro"]["fpr_limit"] = self.fpr_limit
        return curves, per_image


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) on [0, limit] (y linearly interpolated at the limit)."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.size > xs.size:
        xs, ys = np.append(xs, limit), np.append(ys, np.interp(limit, x, y))
    return float(np.dot(np.diff(xs), ys[1:] + ys[:-1]) / 2.0)
