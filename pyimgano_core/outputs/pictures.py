"""Anomaly-map pictures and files that do not mislead: one fixed colour scale per model, a
labelled colour bar, the image score, the defect contour, and a blend that keeps the part visible.

The colour scale comes from the model (calibration: the held-out median map value at the
bottom and the pixel threshold mid-scale; uncalibrated: a few training images), never from
the image itself, so a good part stays blue and only real excess over normal turns red.
The heat is blended in proportion to its value: where the map is at the bottom of the scale
the photo shows through almost unchanged.
"""
from __future__ import annotations

import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np

from ..data.io import read_image
from .files import write_bytes_atomic

if TYPE_CHECKING:
    from ..model import Model

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
WRITERS = 2  # threads encoding and writing picture files (cv2 releases the GIL)


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


# ---------------------------------------------------------------------------------- the scale
def display_range(model: Model) -> tuple[float, float] | None:
    """One fixed colour range for a whole run, from the model: calibrated -> held-out median at
    the bottom, pixel threshold mid-scale; else the range recorded from training images at fit
    time; None for models saved before that (callers fall back to the maps' own range)."""
    thr = model.thresholds
    if thr is not None and thr.pixel is not None and thr.pixel_median is not None:
        return thr.pixel_median, 2 * thr.pixel - thr.pixel_median
    rec = (model.meta or {}).get("display_range")
    if rec:
        return float(rec["lo"]), float(rec["hi"])
    return None


def record_display_range(model: Model, maps: list[np.ndarray], source: str) -> None:
    """Store the colour range of an uncalibrated model: the median of normal map values at the
    bottom and their 99.9% quantile mid-scale (as for a calibrated model's pixel threshold)."""
    if not maps:
        return
    values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
    lo, q = float(np.median(values)), float(np.quantile(values, 0.999))
    if q > lo:
        model.meta["display_range"] = {"lo": lo, "hi": 2 * q - lo, "source": source}


# ---------------------------------------------------------------------------------- files
def write_png(path: Path, image: np.ndarray) -> None:
    """Encode a BGR/grey uint8 image as PNG and write it atomically."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    write_bytes_atomic(path, buf.tobytes())


def save_map_outputs(stem: Path, image_rgb: np.ndarray, amap_full: np.ndarray, vrange: tuple[float, float], mask: np.ndarray | None,
                     score: float | None = None, image_threshold: float | None = None,
                     pixel_threshold: float | None = None) -> dict[str, str]:
    """Write ``<stem>_overlay.png`` (heatmap over the image on the run's fixed scale, with a
    colour bar, the score and the defect contour), ``<stem>_map.npy`` (raw float16 map at
    original resolution) and, when given, ``<stem>_mask.png`` (0/255)."""
    overlay = render_overlay(image_rgb, amap_full, vrange, mask, score, image_threshold, pixel_threshold)
    out = {"overlay": f"{stem}_overlay.png", "map": f"{stem}_map.npy"}
    write_png(Path(out["overlay"]), overlay)
    buf = io.BytesIO()
    np.save(buf, amap_full.astype(np.float16))
    write_bytes_atomic(Path(out["map"]), buf.getvalue())
    if mask is not None:
        out["mask"] = f"{stem}_mask.png"
        write_png(Path(out["mask"]), mask.astype(np.uint8) * 255)
    return out


def output_stem(path: Path, base: Path | None, used: set[str]) -> Path:
    """Relative output stem for one input: its path under ``base`` with the full file name
    kept (``sub/000.png`` -> ``sub/000.png``, so ``000.jpg`` and ``000.png`` never share
    outputs); a remaining clash (e.g. on a case-insensitive disk) gets ``~2``, ``~3``..."""
    rel = path.relative_to(base) if base and path.is_relative_to(base) else Path(path.name)
    stem, n = rel, 1
    while str(stem).casefold() in used:
        n += 1
        stem = rel.with_name(f"{rel.name}~{n}")
    used.add(str(stem).casefold())
    return stem


def save_eval_maps(model: Model, samples: Sequence, owners: Sequence[int], regions: Sequence, read_map: Callable[[int], np.ndarray],
                   value_range: tuple[float, float], folder: Path) -> dict:
    """``eval``'s pictures (``output.save_maps``): overlay, map and mask of each evaluated test image.

    ``read_map(k)`` gives the k-th evaluated map back (from the metrics' spill file, one at a time);
    ``value_range``: the maps' own range, for models saved without a display range.
    """
    thr = model.thresholds
    thr_pixel = thr.pixel if thr is not None else None
    vrange = display_range(model) or value_range
    used: set[str] = set()
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pyimgano-write") as pool:
        jobs = deque()
        for item, (i, (region, hw)) in enumerate(zip(owners, regions)):
            amap = read_map(item)
            x = samples[i]
            full = np.full(hw, vrange[0], np.float32)  # outside the model's view: bottom of the scale
            h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
            full[region] = amap if amap.shape == (h, w) else cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
            mask = model.postprocess.binarize(full, thr_pixel) if thr_pixel is not None else None
            stem = folder / x.defect_type / output_stem(Path(x.path), None, used)
            jobs.append(pool.submit(save_map_outputs, stem, read_image(x.path), full, vrange, mask, None, None, thr_pixel))
            while len(jobs) > 2 * WRITERS:  # bounded: memory stays flat
                jobs.popleft().result()
        for job in jobs:
            job.result()
    return {"folder": str(folder), "display_range": list(vrange)}
