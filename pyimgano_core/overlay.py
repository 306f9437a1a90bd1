"""Overlay pictures that do not mislead: one fixed colour scale per run, a colour bar, the
image score, the defect contour, and a blend that keeps the part visible.

The colour scale comes from the model (calibration: the held-out median map value at the
bottom and the pixel threshold mid-scale; uncalibrated: a few training images), never from
the image itself, so a good part stays blue and only real excess over normal turns red.
The heat is blended in proportion to its value: where the map is at the bottom of the scale
the photo shows through almost unchanged.
"""
from __future__ import annotations

import cv2
import numpy as np

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to a JET heatmap (BGR uint8) over a fixed [vmin, vmax] range."""
    return cv2.applyColorMap((_scaled(amap, vmin, vmax) * 255).astype(np.uint8), cv2.COLORMAP_JET)


def _scaled(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    return np.clip((np.asarray(amap, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color=WHITE) -> None:
    thick = max(1, int(round(scale * 2)))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = org
    cv2.rectangle(img, (x - 2, y - h - 3), (x + w + 2, y + base + 1), BLACK, -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def _colour_bar(height: int, vmin: float, vmax: float, marks: dict[str, float], scale: float) -> np.ndarray:
    """A vertical bar (top = vmax) with its end values and labelled marks (e.g. the threshold)."""
    bar_w = max(12, height // 30)
    label_w = int(110 * scale) + 8
    panel = np.full((height, bar_w + label_w + 8, 3), 32, np.uint8)
    ramp = np.linspace(vmax, vmin, height, dtype=np.float32)[:, None].repeat(bar_w, 1)
    panel[:, 4 : 4 + bar_w] = colorize(ramp, vmin, vmax)
    x_text = bar_w + 8
    _text(panel, f"{vmax:.3g}", (x_text, int(14 * scale) + 4), scale * 0.8)
    _text(panel, f"{vmin:.3g}", (x_text, height - 6), scale * 0.8)
    for name, v in marks.items():
        if vmin <= v <= vmax:
            y = int(round((vmax - v) / max(vmax - vmin, 1e-12) * (height - 1)))
            cv2.line(panel, (0, y), (4 + bar_w + 3, y), WHITE, max(1, height // 300))
            _text(panel, f"{name} {v:.3g}", (x_text, min(max(y + 5, int(28 * scale) + 8), height - int(20 * scale) - 8)), scale * 0.8)
    return panel


def render_overlay(image_rgb: np.ndarray, amap: np.ndarray, vrange: tuple[float, float], mask: np.ndarray | None = None,
                   score: float | None = None, image_threshold: float | None = None,
                   pixel_threshold: float | None = None) -> np.ndarray:
    """BGR uint8 picture: the image with the map blended over it, the defect contour, a header
    with the score (and decision), and a colour bar on the right."""
    vmin, vmax = float(vrange[0]), float(vrange[1])
    base = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    s = _scaled(amap, vmin, vmax)
    alpha = (0.15 + 0.6 * s)[..., None]  # bottom of the scale: 15% tint, the part stays visible
    out = (base * (1 - alpha) + colorize(amap, vmin, vmax).astype(np.float32) * alpha).astype(np.uint8)
    h, w = out.shape[:2]
    scale = max(0.4, min(h, w) / 600)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thick = max(1, min(h, w) // 250)
        cv2.drawContours(out, contours, -1, BLACK, thick + 2)
        cv2.drawContours(out, contours, -1, WHITE, thick)
    if score is not None:
        head = f"score {score:.4g}"
        if image_threshold is not None:
            head += f" (thr {image_threshold:.4g}) " + ("ANOMALOUS" if score >= image_threshold else "normal")
        _text(out, head, (6, int(22 * scale) + 4), scale)
    marks = {"thr": pixel_threshold} if pixel_threshold is not None else {}
    return np.hstack([out, _colour_bar(h, vmin, vmax, marks, scale)])
