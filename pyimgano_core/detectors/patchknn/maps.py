"""Patch grids -> anomaly maps: reshape with a size check, bilinear upsampling and the Gaussian blur."""
from __future__ import annotations

import cv2
import numpy as np


def to_grid(flat: np.ndarray, batch: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Reshape per-patch values [B*h*w] (row-major per image) to [B, h, w], checking the size."""
    flat = np.asarray(flat)
    h, w = grid_hw
    if flat.ndim != 1 or flat.size != batch * h * w:
        raise ValueError(f"expected {batch}*{h}*{w}={batch * h * w} patch values, got array of shape {flat.shape}")
    return flat.reshape(batch, h, w)


def upsample(grids: np.ndarray, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Bilinear upsampling of patch grids [B, h, w] to ``size`` (H, W), then Gaussian blur.

    Bilinear with half-pixel centres (= ``F.interpolate(..., align_corners=False)``), and the
    blur like ``scipy.ndimage.gaussian_filter(sigma, truncate=4, mode="reflect")`` as in the
    PatchCore reference code, applied at model-input resolution (blurring at the original
    900 px would be ~3x weaker; DESIGN.md).
    """
    H, W = size
    out = np.empty((len(grids), H, W), dtype=np.float32)
    radius = int(4.0 * sigma + 0.5)
    for i, g in enumerate(np.asarray(grids, dtype=np.float32)):
        m = cv2.resize(g, (W, H), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            m = cv2.GaussianBlur(m, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = m
    return out
