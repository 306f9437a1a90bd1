"""Exact pixel metrics over test sets whose maps do not fit in memory (two passes).

:func:`pyimgano_core.metrics.pixel_metrics` sorts every pixel of every map at once. Only the
defect pixels (a few %) have to be known individually, though: for every distinct defect-pixel
score ``v`` the curves need how many pixels in total score ``> v`` and ``>= v``. So

1. ``add(mask, map)`` (while scoring) keeps the defect pixels' float32 scores and region ids in
   memory and appends the map, as float32, to a temporary file (unlinked as soon as it is
   opened, so it disappears on any exit, crash included);
2. the first metric call reads the maps back one at a time and counts, per image group (e.g.
   defect type), the pixels falling between consecutive distinct defect scores, by binary
   search (``np.searchsorted``) against them.

Counts are exact integers, so AUROC, AP, AUPRO and the oracle F1 equal the single-sort values
(same float32 cast of the maps, same tie handling). Memory: the defect pixels plus one count
array of 2 x (distinct defect scores) per group; disk: 4 bytes per pixel.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from .metrics import _STRUCTURE, MetricInputError, _Groups, _pixel_curves


class PixelMetricStream:
    """Accumulate (mask, map) pairs; then exact pixel metrics over all or some image groups.

    >>> with PixelMetricStream() as acc:                       # doctest: +SKIP
    ...     for mask, amap, defect in test_set:
    ...         acc.add(mask, amap, group=defect)
    ...     acc.metrics(fpr_limit=0.3)                          # all images
    ...     acc.metrics(0.3, groups={"good", "crack"})          # a subset
    """

    def __init__(self, spill_dir: str | Path | None = None):
        fd, name = tempfile.mkstemp(prefix="pyimgano_maps_", suffix=".f32", dir=spill_dir)
        os.unlink(name)  # the open descriptor keeps the data; nothing is left behind on any exit
        self._file = os.fdopen(fd, "w+b")
        self._items: list[tuple[int, tuple[int, int], str]] = []  # (byte offset, shape, group)
        self._scores: list[np.ndarray] = []  # defect pixels' float32 scores, per image
        self._regions: list[np.ndarray] = []  # their global region ids (int32), per image
        self._pixels: dict[str, int] = {}
        self._n_regions = 0
        self._counts: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------------------ pass 1
    def add(self, mask, amap, group: str = "") -> int:
        """Add one image's ground truth and map (same HxW); returns its item number."""
        if self._counts is not None:
            raise RuntimeError("PixelMetricStream: add() after metrics were computed")
        mask, m = np.asarray(mask), np.asarray(amap)
        if mask.shape != m.shape or m.ndim != 2:
            raise MetricInputError(f"image {len(self._items)}: mask shape {mask.shape} does not match "
                                   f"anomaly map shape {m.shape} (both must be HxW)")
        m = np.ascontiguousarray(m, dtype=np.float32)
        if not np.isfinite(m).all():
            raise MetricInputError("anomaly maps contain NaN or infinite values")
        regions, n = ndimage.label(mask.astype(bool), structure=_STRUCTURE)
        inside = regions > 0
        self._scores.append(m[inside])
        self._regions.append((regions[inside] + (self._n_regions - 1)).astype(np.int32))  # global, 0-based
        self._n_regions += n
        self._file.seek(0, os.SEEK_END)
        self._items.append((self._file.tell(), m.shape, group))
        self._file.write(m.tobytes())
        self._pixels[group] = self._pixels.get(group, 0) + m.size
        return len(self._items) - 1

    def read(self, i: int) -> np.ndarray:
        """The float32 map of item ``i``, read back from the spill file."""
        offset, shape, _ = self._items[i]
        self._file.flush()
        self._file.seek(offset)
        return np.fromfile(self._file, dtype=np.float32, count=shape[0] * shape[1]).reshape(shape)

    def __len__(self) -> int:
        return len(self._items)

    # ------------------------------------------------------------------------------ pass 2
    def _values(self) -> np.ndarray:
        """Distinct defect-pixel scores, ascending (the only thresholds any curve needs)."""
        if not hasattr(self, "_distinct"):
            self._distinct = np.unique(np.concatenate(self._scores)) if self._scores else np.zeros(0, np.float32)
        return self._distinct

    def _count(self) -> dict[str, np.ndarray]:
        """Per group: hist[b] = pixels with code b = 2 * #(values < x) + (x is a value)."""
        if self._counts is None:
            v = self._values()
            k = len(v)
            dtype = {g: np.int32 if n < 2**31 else np.int64 for g, n in self._pixels.items()}
            counts = {g: np.zeros(2 * k + 1, dtype[g]) for g in self._pixels}
            for i, (_, _, group) in enumerate(self._items):
                x = self.read(i).ravel()
                hist = counts[group]
                high = np.sort(x[x >= v[0]]) if k else x[:0]  # sorted keys: cache-friendly binary searches
                hist[0] += x.size - high.size  # below every defect score: code 0
                if high.size == 0:
                    continue
                left = np.searchsorted(v, high, side="left")
                code = 2 * left + (v[np.minimum(left, k - 1)] == high)
                starts = np.flatnonzero(np.append(True, code[1:] != code[:-1]))  # codes are sorted
                hist[code[starts]] += np.diff(np.append(starts, code.size)).astype(hist.dtype)
            self._counts = counts
        return self._counts

    def _groups(self, groups: set[str] | None) -> tuple[_Groups, np.ndarray]:
        """The defect-pixel groups (as metrics._positive_groups) over images in ``groups``."""
        if not self._items:
            raise MetricInputError("no anomaly maps given")
        keep = [i for i, it in enumerate(self._items) if groups is None or it[2] in groups]
        scores = np.concatenate([self._scores[i] for i in keep]) if keep else np.zeros(0, np.float32)
        regions = np.concatenate([self._regions[i] for i in keep]) if keep else np.zeros(0, np.int32)
        n = sum(n for g, n in self._pixels.items() if groups is None or g in groups)
        if regions.size == 0:
            raise MetricInputError("pixel metrics: masks contain no defect region")
        if regions.size == n:
            raise MetricInputError("pixel metrics: masks contain no background pixel")
        if len(keep) < len(self._items):  # number the regions of the kept images 0..R-1
            present = np.zeros(self._n_regions, bool)
            present[regions] = True
            regions = (np.cumsum(present) - 1).astype(np.int32)[regions]
        order = np.argsort(scores, kind="stable")[::-1]
        positives, regions = scores[order], regions[order]
        del scores, order
        hist = sum(c.astype(np.int64) for g, c in self._count().items() if groups is None or g in groups)
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[b] = pixels with code >= b
        starts = np.flatnonzero(np.append(True, positives[1:] != positives[:-1]))
        value = positives[starts]
        j = np.searchsorted(self._values(), value)  # position of each group's value among all values
        g = _Groups(value=value, t0=starts, t1=np.append(starts[1:], positives.size),
                    c0=at_least[2 * j + 2], c1=at_least[2 * j + 1], n_pos=positives.size, n_neg=n - positives.size)
        return g, regions

    def metrics(self, fpr_limit: float = 0.3, groups: set[str] | None = None) -> dict:
        """``pixel_auroc``, ``pixel_ap``, ``aupro`` over the images of ``groups`` (None: all);
        the same definitions and values as :func:`pyimgano_core.metrics.pixel_metrics`."""
        if not 0.0 < fpr_limit <= 1.0:
            raise MetricInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        g, regions = self._groups(groups)
        return _pixel_curves(g, regions, fpr_limit)

    def f1_max(self, groups: set[str] | None = None) -> tuple[float, float]:
        """Oracle pixel F1-max and its threshold, as :func:`pyimgano_core.metrics.f1_max`."""
        g, _ = self._groups(groups)
        f1 = 2.0 * g.t1 / (g.c1 + g.n_pos)
        best = int(np.argmax(f1))
        return float(f1[best]), float(g.value[best])

    # ------------------------------------------------------------------------------ cleanup
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PixelMetricStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
