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
    labels = [f"{vmax:.3g}", f"{vmin:.3g}", *(f"{name} {v:.3g}" for name, v in marks.items())]
    thick = max(1, int(round(scale * 0.8 * 2)))
    label_w = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8, thick)[0][0] for t in labels) + 12  # labels whole
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
            head += f" (image threshold {image_threshold:.4g}) " + ("ANOMALOUS" if score >= image_threshold else "normal")
        fit = min(scale, scale * (w - 16) / max(1, cv2.getTextSize(head, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, int(round(scale * 2))))[0][0]))
        _text(out, head, (6, int(22 * fit) + 4), fit)  # shrunk to the image width: never cut
    marks = {"pixel thr": pixel_threshold} if pixel_threshold is not None else {}  # map values, not image scores
    return np.hstack([out, _colour_bar(h, vmin, vmax, marks, scale)])


def colour_bar_strip(width: int, vmin: float, vmax: float, pixel_threshold: float | None = None) -> np.ndarray:
    """A horizontal, labelled colour bar (BGR) for a page of thumbnails drawn on [vmin, vmax]:
    the end values and the pixel threshold (a white tick), titled with what the colours are."""
    bar_h, pad = 18, 10
    panel = np.full((bar_h + 56, width, 3), 255, np.uint8)
    x0, x1 = pad, width - pad
    ramp = np.linspace(vmin, vmax, x1 - x0, dtype=np.float32)[None, :].repeat(bar_h, 0)
    panel[22 : 22 + bar_h, x0:x1] = colorize(ramp, vmin, vmax)
    font, ink = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    cv2.putText(panel, "anomaly map value (one scale for every picture of this model)", (x0, 15), font, 0.45, ink, 1, cv2.LINE_AA)
    y = 22 + bar_h + 16
    cv2.putText(panel, f"{vmin:.4g}", (x0, y), font, 0.45, ink, 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(f"{vmax:.4g}", font, 0.45, 1)
    cv2.putText(panel, f"{vmax:.4g}", (x1 - tw, y), font, 0.45, ink, 1, cv2.LINE_AA)
    if pixel_threshold is not None and vmin <= pixel_threshold <= vmax:
        x = int(round(x0 + (pixel_threshold - vmin) / max(vmax - vmin, 1e-12) * (x1 - x0 - 1)))
        cv2.line(panel, (x, 20), (x, 22 + bar_h + 2), WHITE, 3)
        cv2.line(panel, (x, 20), (x, 22 + bar_h + 2), BLACK, 1)
        label = f"pixel threshold {pixel_threshold:.4g}"
        (tw, _), _ = cv2.getTextSize(label, font, 0.45, 1)
        cv2.putText(panel, label, (min(max(x - tw // 2, x0), x1 - tw), y + 16), font, 0.45, ink, 1, cv2.LINE_AA)
    return panel
