"""Image geometry: how an original image is resized/cropped for a model, and back.

A :class:`Geometry` is a rule, not a size: applied to an image of any size it gives the
model input and the box of the original image that the input shows. Detectors return maps
at the model input size together with that box, and the engine maps them back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np


def _pair(v: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class Geometry:
    """Resize then centre-crop rule.

    Parameters
    ----------
    size
        ``squash``: the exact (h, w) the image is resized to (an int means square).
        ``shorter_side``: the length of the shorter side after an aspect-preserving resize.
    crop
        Optional centre crop (h, w) applied after the resize.
    multiple
        Optional: after resize and crop, crop further (centred) so both sides are a multiple
        of this number (a ViT's patch size).
    mode
        ``squash`` (default, whole image kept, aspect ratio changed) or ``shorter_side``.
    """

    size: int | tuple[int, int] = 256
    crop: int | tuple[int, int] | None = None
    multiple: int | None = None
    mode: Literal["squash", "shorter_side"] = "squash"

    def resized_hw(self, orig_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = orig_hw
        if self.mode == "squash":
            return _pair(self.size)
        s = self.size if isinstance(self.size, int) else min(self.size)
        # torchvision's Resize(int) (the PatchCore, SoftPatch and AnomalyDINO references): the
        # shorter side becomes s, the longer int(s * long / short), truncated.
        if h <= w:
            return (s, max(1, int(s * w / h)))
        return (max(1, int(s * h / w)), s)

    def input_hw(self, orig_hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) of the model input for an image of size ``orig_hw``."""
        rh, rw = self.resized_hw(orig_hw)
        crop = _pair(self.crop)
        h, w = (min(crop[0], rh), min(crop[1], rw)) if crop else (rh, rw)
        if self.multiple:
            h, w = h - h % self.multiple, w - w % self.multiple
        return h, w

    def _offsets(self, orig_hw: tuple[int, int]) -> tuple[int, int]:
        # torchvision's CenterCrop: top = int(round((h - crop_h) / 2)) (Python's round, half to even)
        rh, rw = self.resized_hw(orig_hw)
        ih, iw = self.input_hw(orig_hw)
        return int(round((rh - ih) / 2.0)), int(round((rw - iw) / 2.0))

    def box(self, orig_hw: tuple[int, int]) -> tuple[float, float, float, float]:
        """(y0, x0, y1, x1) of the original image that the model input shows."""
        rh, rw = self.resized_hw(orig_hw)
        ih, iw = self.input_hw(orig_hw)
        sy, sx = orig_hw[0] / rh, orig_hw[1] / rw
        oy, ox = self._offsets(orig_hw)
        y0, x0 = oy * sy, ox * sx
        return (y0, x0, y0 + ih * sy, x0 + iw * sx)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Resize and crop an HxWx3 uint8 image to the model input."""
        orig_hw = image.shape[:2]
        rh, rw = self.resized_hw(orig_hw)
        ih, iw = self.input_hw(orig_hw)
        # INTER_AREA anti-aliases when shrinking (like torchvision's antialiased resize).
        interp = cv2.INTER_AREA if rh * rw < orig_hw[0] * orig_hw[1] else cv2.INTER_LINEAR
        out = cv2.resize(image, (rw, rh), interpolation=interp)
        y0, x0 = self._offsets(orig_hw)
        return np.ascontiguousarray(out[y0 : y0 + ih, x0 : x0 + iw])

    def describe(self) -> dict:
        return {"mode": self.mode, "size": self.size, "crop": self.crop, "multiple": self.multiple}


def map_to_original(amap: np.ndarray, orig_hw: tuple[int, int], box) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Resize a model-geometry map onto its box of the original image.

    Returns the map at original resolution (only the box region) and the slices of the
    original image that it covers. Pixels outside the box were never seen by the model and
    are not evaluated (the report states the covered fraction).
    """
    y0, x0, y1, x1 = (int(round(v)) for v in box)
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(orig_hw[0], y1), min(orig_hw[1], x1)
    if amap.shape != (y1 - y0, x1 - x0):
        amap = cv2.resize(amap.astype(np.float32, copy=False), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return amap, (slice(y0, y1), slice(x0, x1))


def auto_input_hw(sizes, pixel_budget: int, multiple: int) -> tuple[tuple[int, int], float]:
    """``image_size: auto``: a fixed model input (h, w) from the images' sizes and a pixel budget.

    The aspect ratio is the median of ``w / h`` over ``sizes`` (so the order of the images and a
    few odd ones do not matter); ``h * w`` is about ``pixel_budget``, each side rounded to the
    nearest multiple of ``multiple`` (the backbone's largest stride, so every tap's grid is
    whole), at least one multiple. Returns ((h, w), median aspect).
    """
    hw = np.asarray(list(sizes), dtype=np.float64).reshape(-1, 2)
    if not len(hw):
        raise ValueError("image_size auto needs at least one image size")
    aspect = float(np.median(hw[:, 1] / hw[:, 0]))
    h = math.sqrt(pixel_budget / aspect)
    side = lambda v: max(multiple, int(round(v / multiple)) * multiple)  # noqa: E731
    return (side(h), side(h * aspect)), aspect
