"""What the HTML report needs, collected while the engine scores the test split (one pass).

Per image the engine hands over its score, its map and ground truth at evaluation
resolution; this keeps only small things: streaming pixel-curve histograms, the
defect pixels' bins for per-image PRO, and ~200 px thumbnails of the maps that can end
up among the worst cases (every defective image; the top-scoring good ones). At the end
:meth:`ReportCollector.finish` picks the worst cases, writes one small PNG per case
under ``report_assets/`` and returns the JSON parts of the report (curves, worst cases),
so ``pyimgano report`` can rebuild the page from saved files alone.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from ...data.io import read_image
from ..files import check_writable, clean_stale, temp_path, write_bytes_atomic, write_error
from ..pictures import colorize, colour_bar_strip, write_png
from .curves import PixelCurves, image_curves

THUMB = 192  # longest side of each panel, pixels
N_WORST = 6  # cases per group
ASSETS = "report_assets"
COLOUR_BAR = "colour_bar.png"


def _thumb(a: np.ndarray, interpolation: int) -> np.ndarray:
    h, w = a.shape[:2]
    scale = min(1.0, THUMB / max(h, w))  # never upscale
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(a, size, interpolation=interpolation)


class ReportCollector:
    """Feed with :meth:`add` for every scored test image, then call :meth:`finish` once."""

    def __init__(self, fpr_limit: float):
        self.pixel = PixelCurves(fpr_limit)
        self.thumbs: dict[int, tuple] = {}  # index -> (map thumb float16, gt thumb or None, region)
        self._good: list[tuple[float, int]] = []  # min-heap (score, -index) of the highest-scoring good images
        self.seconds = 0.0

    def add(self, index: int, label: int, score: float, amap: np.ndarray | None, gt: np.ndarray | None,
            region: tuple[slice, slice] | None) -> None:
        t0 = time.perf_counter()
        if amap is not None:
            if gt is not None:
                self.pixel.add(gt, amap, index)
            keep = label == 1
            if not keep:
                item = (score, -index)  # ties: the earlier image wins, as the stable sort in finish()
                if len(self._good) < N_WORST:
                    heapq.heappush(self._good, item)
                    keep = True
                elif item > self._good[0]:
                    _, dropped = heapq.heappushpop(self._good, item)
                    self.thumbs.pop(-dropped, None)
                    keep = True
            if keep:
                small_gt = None if gt is None or not gt.any() else _thumb(gt.astype(np.uint8), cv2.INTER_NEAREST)
                self.thumbs[index] = (_thumb(np.asarray(amap, np.float32), cv2.INTER_AREA).astype(np.float16), small_gt, region)
        self.seconds += time.perf_counter() - t0

    def finish(self, samples, labels: np.ndarray, scores: np.ndarray, out_dir: Path,
               vrange: tuple[float, float] | None, pixel_threshold: float | None = None) -> dict:
        """Curves and worst cases for report.json; the cases' PNGs go to ``out_dir/report_assets``."""
        t0 = time.perf_counter()
        pixel, per_image_pro = self.pixel.finish()
        curves = {"image": image_curves(labels, scores), "pixel": pixel,
                  "how": "exact points (score >= threshold), downsampled along the curve; pixel thresholds on a "
                         "float32 grid of relative step 2^-11; PRO linearly interpolated at the FPR limit"}
        good = [i for i in np.argsort(-scores, kind="stable") if labels[i] == 0][:N_WORST]
        bad = [i for i in np.argsort(scores, kind="stable") if labels[i] == 1][:N_WORST]
        pro_order = sorted(per_image_pro, key=lambda i: (per_image_pro[i], i))[:N_WORST]
        groups = {"highest_scoring_good": good, "lowest_scoring_defective": bad, "worst_localised": pro_order}
        worst = {}
        model_range = vrange is not None
        if vrange is None:
            vrange = (self.pixel.lo, self.pixel.hi) if np.isfinite(self.pixel.lo) else (0.0, 1.0)
        with new_assets(out_dir / ASSETS) as assets:  # all or nothing: a full disk leaves the old folder
            self._write_groups(groups, samples, scores, per_image_pro, assets, vrange, worst)
            _write_colour_bar(assets / COLOUR_BAR, vrange, pixel_threshold)
        worst["colour_range"] = [float(vrange[0]), float(vrange[1])]
        worst["colour_range_from"] = "the model's display range (as its overlays)" if model_range else "this test set's maps"
        worst["colour_bar"] = f"{ASSETS}/{COLOUR_BAR}"
        worst["pixel_threshold"] = pixel_threshold
        worst["per_image_aupro"] = ("PRO of the image's own defect regions against the FPR over all defect-free "
                                    "test pixels, to the FPR limit, normalised (the pooled AUPRO averages these)")
        self.seconds += time.perf_counter() - t0
        return {"curves": curves, "worst_cases": worst}

    def _write_groups(self, groups, samples, scores, per_image_pro, assets: Path, vrange, worst: dict) -> None:
        for group, picks in groups.items():
            rows = []
            for rank, i in enumerate(picks):
                x = samples[i]
                row = {"path": str(x.path), "defect_type": x.defect_type, "score": float(scores[i]),
                       "aupro": per_image_pro.get(i)}
                if i in self.thumbs:
                    name = f"{group}_{rank}.png"
                    _write_case(assets / name, x.path, self.thumbs[i], vrange)
                    row["image"] = f"{ASSETS}/{name}"
                rows.append(row)
            worst[group] = rows


@contextlib.contextmanager
def new_assets(folder: Path):
    """A fresh temp folder to fill, renamed over ``folder`` only when complete (else removed)."""
    check_writable(folder.parent, "report folder")
    clean_stale(folder.parent, folder.name)
    tmp, old = temp_path(folder), temp_path(folder, ".old")
    try:
        tmp.mkdir()
        yield tmp
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # put the earlier assets back
        raise write_error(exc, f"Cannot write {folder}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_colour_bar(path: Path, vrange: tuple[float, float], pixel_threshold: float | None) -> None:
    write_png(path, colour_bar_strip(2 * THUMB + 4, float(vrange[0]), float(vrange[1]), pixel_threshold))


def _write_case(path: Path, image_path, thumb: tuple, vrange: tuple[float, float]) -> None:
    """One tile: [image + ground-truth contour | anomaly-map overlay + contour], side by side."""
    amap, gt, region = thumb
    image = read_image(image_path)
    if region is not None:
        image = image[region]
    h, w = amap.shape
    image = cv2.cvtColor(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    overlay = cv2.addWeighted(image, 0.5, colorize(amap.astype(np.float32), *vrange), 0.5, 0)
    if gt is not None:
        contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for panel in (image, overlay):
            cv2.drawContours(panel, contours, -1, (0, 255, 0), 1, lineType=cv2.LINE_AA)
    tile = np.concatenate((image, np.full((h, 4, 3), 255, np.uint8), overlay), axis=1)
    ok, buf = cv2.imencode(".png", tile)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    write_bytes_atomic(path, buf.tobytes())
