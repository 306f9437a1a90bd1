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
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from .metrics import STRUCTURE, MetricInputError, Groups, pixel_curves


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
        self._keys: list[np.ndarray] = []  # per image, per defect pixel: sortable score bits << 32 | region id
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
        m = m + np.float32(0.0)  # -0.0 -> +0.0: equal floats must get equal keys
        regions, n = ndimage.label(mask.astype(bool), structure=STRUCTURE)
        inside = regions > 0
        key = _sortable(m[inside]).astype(np.uint64) << np.uint64(32)
        key |= (regions[inside] + (self._n_regions - 1)).astype(np.uint64)  # global region id, 0-based
        self._keys.append(key)
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
            bits, at = np.empty(sum(len(k) for k in self._keys), np.uint32), 0
            for k in self._keys:  # the score halves, one image at a time (no 8-byte copies)
                bits[at : at + len(k)] = k >> np.uint64(32)
                at += len(k)
            bits.sort()
            self._distinct = _unsortable(bits[np.append(True, bits[1:] != bits[:-1])]) if bits.size else np.zeros(0, np.float32)
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

    def _groups(self, groups: set[str] | None) -> tuple[Groups, np.ndarray]:
        """The defect-pixel groups (as metrics._positive_groups) over images in ``groups``."""
        if not self._items:
            raise MetricInputError("no anomaly maps given")
        keep = [i for i, it in enumerate(self._items) if groups is None or it[2] in groups]
        key = np.concatenate([self._keys[i] for i in keep]) if keep else np.zeros(0, np.uint64)
        n = sum(n for g, n in self._pixels.items() if groups is None or g in groups)
        if key.size == 0:
            raise MetricInputError("pixel metrics: masks contain no defect region")
        if key.size == n:
            raise MetricInputError("pixel metrics: masks contain no background pixel")
        # One in-place sort of 8 bytes per defect pixel orders scores and carries region ids;
        # descending score = the halves of the ascending keys read backwards (no copies).
        key.sort()
        halves = key.view(np.uint32).reshape(-1, 2)
        lo = 0 if sys.byteorder == "little" else 1
        bits, regions = halves[::-1, 1 - lo], halves[::-1, lo].view(np.int32)
        if len(keep) < len(self._items):  # number the regions of the kept images 0..R-1
            present = np.zeros(self._n_regions, bool)
            present[regions] = True
            regions = (np.cumsum(present) - 1).astype(np.int32)[regions]
        starts = np.flatnonzero(np.append(True, bits[1:] != bits[:-1]))
        value = _unsortable(bits[starts])
        at_least = np.zeros(2 * len(self._values()) + 1, np.int64)
        for name, c in self._count().items():
            if groups is None or name in groups:
                at_least += c
        np.cumsum(at_least[::-1], out=at_least[::-1])  # at_least[b] = pixels with code >= b (in place)
        j = np.searchsorted(self._values(), value)  # position of each group's value among all values
        g = Groups(value=value, t0=starts, t1=np.append(starts[1:], key.size),
                    c0=at_least[2 * j + 2], c1=at_least[2 * j + 1], n_pos=key.size, n_neg=n - key.size)
        return g, regions

    def metrics(self, fpr_limit: float = 0.3, groups: set[str] | None = None) -> dict:
        """``pixel_auroc``, ``pixel_ap``, ``aupro`` over the images of ``groups`` (None: all);
        the same definitions and values as :func:`pyimgano_core.metrics.pixel_metrics`."""
        if not 0.0 < fpr_limit <= 1.0:
            raise MetricInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        g, regions = self._groups(groups)
        return pixel_curves(g, regions, fpr_limit)

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


def _sortable(x: np.ndarray) -> np.ndarray:
    """uint32 codes of float32 ``x`` (no NaN, no -0.0) whose unsigned order is the float order."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where(b >> np.uint32(31), ~b, b | np.uint32(0x80000000))


def _unsortable(code: np.ndarray) -> np.ndarray:
    """float32 values of :func:`_sortable` codes."""
    code = np.asarray(code, dtype=np.uint32)
    return np.where(code >> np.uint32(31), code & np.uint32(0x7FFFFFFF), ~code).view(np.float32)
