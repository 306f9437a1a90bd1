"""The writing side of the engine: overlay colour scale, eval map files and ``export-maps`` outputs.

Scoring stays in :mod:`pyimgano_core.engine` (``score_stream``); this module only turns scored
images into files, on a small writer pool with a bounded queue so memory stays flat.
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from .data.io import read_image
from .engine import WRITERS, Progress, Scored, peak_rss_mb, score_stream
from .metrics_stream import PixelMetricStream
from .outputs import check_writable, clean_stale, folder_lock, temp_path
from .predictions import check_same_model, merge, read_earlier
from .reports import dumps, save_map_outputs, write_json

if TYPE_CHECKING:
    from .model import Model


def _display_range(model: Model) -> tuple[float, float] | None:
    """One fixed colour range for a whole run, from the model: calibrated -> held-out median at
    the bottom, pixel threshold mid-scale; else the range recorded from training images at fit
    time; None for models saved before that (callers fall back to the maps' own range)."""
    thr = model.thresholds
    if thr is not None and thr.pixel is not None and thr.pixel_median is not None:
        return thr.pixel_median, 2 * thr.pixel - thr.pixel_median
    rec = model.meta.get("display_range")
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


def _save_eval_maps(model: Model, samples, owners, regions, pixels: PixelMetricStream, value_range, folder: Path) -> dict:
    thr = model.thresholds
    thr_pixel = thr.pixel if thr is not None else None
    vrange = _display_range(model) or value_range
    used: set[str] = set()
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pyimgano-write") as pool:
        jobs = deque()
        for item, (i, (region, hw)) in enumerate(zip(owners, regions)):
            amap = pixels.read(item)  # back from the spill file, one map at a time
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


# ---------------------------------------------------------------------------------- export
def export_images(model: Model, images: Sequence[Path], out_dir: Path, progress: Progress | None = None,
                  base: Path | None = None) -> dict:
    """Score any images (no labels) and write, per image, an overlay PNG, the raw map (float16
    .npy), a binary defect mask PNG (when the model has thresholds) and one line of
    ``predictions.jsonl``. Streams: memory does not grow with the number of images. An
    unreadable image is reported in the summary and skipped."""
    check_writable(out_dir)
    with folder_lock(out_dir, "export-maps"):
        return _export_locked(model, images, out_dir, progress, base)


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


def _export_locked(model: Model, images: Sequence[Path], out_dir: Path, progress: Progress | None, base: Path | None) -> dict:
    clean_stale(out_dir, "predictions.jsonl")
    thr = model.thresholds
    vrange = _display_range(model)
    earlier = read_earlier(out_dir)  # before any work: an unreadable file or another model's rows are refused
    check_same_model(out_dir, thr.to_dict() if thr else None, list(vrange) if vrange else None)
    partial = temp_path(out_dir / "predictions.jsonl", ".partial")
    failures, n_ok, n_anomalous, used = [], 0, 0, set()

    def write(s: Scored, path: Path, stem: Path) -> dict:  # on a writer thread: cv2 encoding releases the GIL
        row = {"path": str(path), "output": stem.as_posix(), "score": s.score}
        if thr is not None:
            row["is_anomalous"] = bool(s.score >= thr.image)
        if s.amap is not None:
            lo, hi = vrange or (float(s.amap.min()), float(s.amap.max()))  # models saved before display_range
            full = np.full(s.orig_hw, lo, np.float32)
            full[s.region] = s.amap
            mask = model.postprocess.binarize(full, thr.pixel) if thr is not None and thr.pixel is not None else None
            row["files"] = save_map_outputs(out_dir / stem, s.image, full, (lo, hi), mask, s.score,
                                            thr.image if thr else None, thr.pixel if thr else None)
            if mask is not None:
                n_regions, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
                row.update(defect_area_px=int(mask.sum()), n_regions=int(n_regions - 1))
        return row

    t0 = time.perf_counter()
    try:
        with open(partial, "w") as lines, ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pyimgano-write") as pool:
            jobs: deque = deque()

            def finish_oldest() -> None:  # rows keep input order
                nonlocal n_ok, n_anomalous
                row = jobs.popleft().result()
                n_anomalous += bool(row.get("is_anomalous"))
                lines.write(dumps(row) + "\n")
                n_ok += 1

            for s in score_stream(model, list(images), progress, f"exporting maps for {len(images)} images", keep_images=True):
                path = Path(images[s.index])
                if s.error:
                    failures.append({"path": str(path), "error": s.error})
                    continue
                stem = output_stem(path, base, used)  # stems in input order
                jobs.append(pool.submit(write, s, path, stem))
                while len(jobs) > 2 * WRITERS:  # bounded queue: memory stays flat
                    finish_oldest()
            while jobs:
                finish_oldest()
        if n_ok:  # a run that scores nothing changes nothing (predictions.py: the rule for a second export)
            n_rows, n_kept = _merge_into(out_dir, earlier, partial)
    finally:
        partial.unlink(missing_ok=True)
    if not n_ok:
        n_rows, n_kept = len(earlier), len(earlier)
    elapsed = time.perf_counter() - t0
    summary = {
        "n_images": len(images), "n_scored": n_ok, "n_failed": len(failures), "failures": failures,
        "n_anomalous": n_anomalous if thr is not None else None,
        "thresholds": thr.to_dict() if thr else None,
        "display_range": list(vrange) if vrange else "per-image min-max (model saved without a display range)",
        "display_range_from": ("calibration holdout" if thr is not None and thr.pixel is not None
                               else (model.meta.get("display_range") or {}).get("source")),
        "seconds": elapsed, "images_per_s": n_ok / elapsed if elapsed > 0 else None, "peak_rss_mb": peak_rss_mb(),
        "outputs": "<input file name>_overlay.png, _map.npy (float16, original resolution), _mask.png (0/255), "
                   "under the input's relative path",
        "out_dir": str(out_dir),
        "n_predictions": n_rows, "n_kept_from_earlier": n_kept,
        "rule": "a second export adds per input: an input with the same output name replaces its row and files, "
                "earlier rows of other inputs are kept; a run that scores nothing changes nothing",
    }
    if n_ok:
        write_json(out_dir / "summary.json", summary)
    return summary


def _merge_into(out_dir: Path, earlier: list[dict], partial: Path) -> tuple[int, int]:
    """predictions.jsonl := the earlier rows this run did not replace, then this run's rows."""
    with open(partial) as fh:
        new = [json.loads(line) for line in fh]
    rows, n_kept = merge(earlier, new, out_dir)
    merged = temp_path(out_dir / "predictions.jsonl", ".partial")
    try:
        with open(merged, "w") as fh:
            fh.writelines(dumps(r) + "\n" for r in rows)
        merged.replace(out_dir / "predictions.jsonl")
    finally:
        merged.unlink(missing_ok=True)
    return len(rows), n_kept
