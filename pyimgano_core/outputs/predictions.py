"""``export-maps``' outputs: per image an overlay, map and mask and a row of ``predictions.jsonl``;
``summary.json``; and the rule for a second export into a folder that already holds one.

* A run that scores no image changes nothing: ``predictions.jsonl``, ``summary.json`` and every
  earlier overlay, map and mask stay as they were.
* Otherwise the run adds per input: an input whose output name (``output``, its path under the
  input folder) is already in ``predictions.jsonl`` replaces that row and its files; every other
  earlier row is kept, first and in its order, then this run's rows in input order. So the
  folder's ``predictions.jsonl`` lists exactly the images whose files are present, and
  ``summary.json`` counts that whole list (``n_predictions``) beside this run's numbers.
* Rows of another model cannot be mixed in: when the folder's ``summary.json`` records other
  thresholds or another display range, the run is refused before any work (one line).
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import OutputError
from .files import clean_stale, dumps, temp_path, write_json
from .pictures import WRITERS, display_range, output_stem, save_map_outputs

if TYPE_CHECKING:
    from ..model import Model

PREDICTIONS = "predictions.jsonl"


def row_key(row: dict, out_dir: Path) -> str:
    """The output name a row's files are written under (rows from 85eb923 have no ``output``:
    their overlay's path under ``out_dir``, else the input path)."""
    if "output" in row:
        return str(row["output"])
    overlay = (row.get("files") or {}).get("overlay")
    if overlay:
        text, root = str(overlay), str(out_dir).rstrip("/") + "/"
        if text.startswith(root) and text.endswith("_overlay.png"):
            return text[len(root) : -len("_overlay.png")]
    return "path:" + str(row.get("path"))


def read_earlier(out_dir: Path) -> list[dict]:
    """Rows of an earlier export in ``out_dir`` (empty when there is none); a file we cannot
    read as our JSON lines is refused in one line, before any work."""
    path = out_dir / PREDICTIONS
    if not path.exists():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path} cannot be read as earlier predictions ({type(exc).__name__}); "
                          "move it away or use another --out") from None
    if not all(isinstance(r, dict) and "path" in r and "score" in r for r in rows):
        raise OutputError(f"{path} is not a predictions file written by pyimgano; move it away or use another --out")
    return rows


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_same_model(out_dir: Path, thresholds: dict | None, display_range) -> None:
    """Refuse to add rows of a model with other thresholds or another colour scale."""
    path = out_dir / "summary.json"
    if not (out_dir / PREDICTIONS).exists() or not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # nothing to compare with; the rows themselves were checked
    keep = ("image", "pixel")
    old_thr = {k: (earlier.get("thresholds") or {}).get(k) for k in keep} if earlier.get("thresholds") else None
    new_thr = {k: thresholds.get(k) for k in keep} if thresholds else None
    old_range = earlier.get("display_range")
    old_range = old_range if isinstance(old_range, list) else None  # models saved without one: a note, not a range
    if not _same(old_thr, new_thr) or not _same(old_range, display_range):
        raise OutputError(f"{out_dir} holds predictions of another model (other thresholds or colour scale); "
                          "use another --out (a folder holds one model's predictions)")


def merge(earlier: list[dict], new: list[dict], out_dir: Path) -> tuple[list[dict], int]:
    """(rows of the folder after this run, number of earlier rows kept)."""
    replaced = {row_key(r, out_dir) for r in new}
    kept = [r for r in earlier if row_key(r, out_dir) not in replaced]
    return kept + new, len(kept)


class ExportWriter:
    """Writes one export-maps run into ``out_dir`` (held under its lock by the caller).

    ``add(scored, path)`` queues an image's files and row on a small writer pool (bounded queue:
    memory stays flat; rows keep input order); ``fail(path, reason)`` records an image that could
    not be scored; ``finish(n_images)`` merges the rows into the folder by the rule above and
    writes ``summary.json``. Earlier predictions and the model's match are checked on creation,
    before any work; a run that scores nothing changes nothing.
    """

    def __init__(self, model: Model, out_dir: Path, base: Path | None = None):
        self.model, self.out_dir, self.base = model, out_dir, base
        clean_stale(out_dir, PREDICTIONS)
        thr = model.thresholds
        self.vrange = display_range(model)
        self.earlier = read_earlier(out_dir)  # an unreadable file or another model's rows are refused now
        check_same_model(out_dir, thr.to_dict() if thr else None, list(self.vrange) if self.vrange else None)
        self.partial = temp_path(out_dir / PREDICTIONS, ".partial")
        self.failures: list[dict] = []
        self.n_ok = self.n_anomalous = 0
        self.used: set[str] = set()
        self.jobs: deque = deque()
        self.t0 = time.perf_counter()

    def __enter__(self) -> "ExportWriter":
        self.lines = open(self.partial, "w")
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="pyimgano-write")
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.lines.close()
        self.partial.unlink(missing_ok=True)

    def fail(self, path: Path, reason: str) -> None:
        self.failures.append({"path": str(path), "error": reason})

    def add(self, scored, path: Path) -> None:
        """Queue one scored image (``engine.Scored`` with its decoded image)."""
        stem = output_stem(path, self.base, self.used)  # stems in input order
        self.jobs.append(self.pool.submit(self._write, scored, path, stem))
        while len(self.jobs) > 2 * WRITERS:
            self._finish_oldest()

    def _write(self, s, path: Path, stem: Path) -> dict:  # on a writer thread: cv2 encoding releases the GIL
        thr = self.model.thresholds
        row = {"path": str(path), "output": stem.as_posix(), "score": s.score}
        if thr is not None:
            row["is_anomalous"] = bool(s.score >= thr.image)
        if s.amap is not None:
            lo, hi = self.vrange or (float(s.amap.min()), float(s.amap.max()))  # models saved before display_range
            full = np.full(s.orig_hw, lo, np.float32)
            full[s.region] = s.amap
            mask = self.model.postprocess.binarize(full, thr.pixel) if thr is not None and thr.pixel is not None else None
            row["files"] = save_map_outputs(self.out_dir / stem, s.image, full, (lo, hi), mask, s.score,
                                            thr.image if thr else None, thr.pixel if thr else None)
            if mask is not None:
                n_regions, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
                row.update(defect_area_px=int(mask.sum()), n_regions=int(n_regions - 1))
        return row

    def _finish_oldest(self) -> None:
        row = self.jobs.popleft().result()
        self.n_anomalous += bool(row.get("is_anomalous"))
        self.lines.write(dumps(row) + "\n")
        self.n_ok += 1

    def finish(self, n_images: int, peak_rss_mb: float | None = None) -> dict:
        """Rows merged into the folder and ``summary.json`` written (nothing changes when no image scored)."""
        while self.jobs:
            self._finish_oldest()
        self.lines.close()
        n_rows = n_kept = len(self.earlier)
        if self.n_ok:
            n_rows, n_kept = self._merge()
        elapsed = time.perf_counter() - self.t0
        thr, vrange = self.model.thresholds, self.vrange
        summary = {
            "n_images": n_images, "n_scored": self.n_ok, "n_failed": len(self.failures), "failures": self.failures,
            "n_anomalous": self.n_anomalous if thr is not None else None,
            "thresholds": thr.to_dict() if thr else None,
            "display_range": list(vrange) if vrange else "per-image min-max (model saved without a display range)",
            "display_range_from": ("calibration holdout" if thr is not None and thr.pixel is not None
                                   else (self.model.meta.get("display_range") or {}).get("source")),
            "seconds": elapsed, "images_per_s": self.n_ok / elapsed if elapsed > 0 else None, "peak_rss_mb": peak_rss_mb,
            "outputs": "<input file name>_overlay.png, _map.npy (float16, original resolution), _mask.png (0/255), "
                       "under the input's relative path",
            "out_dir": str(self.out_dir),
            "n_predictions": n_rows, "n_kept_from_earlier": n_kept,
            "rule": "a second export adds per input: an input with the same output name replaces its row and files, "
                    "earlier rows of other inputs are kept; a run that scores nothing changes nothing",
        }
        if self.n_ok:
            write_json(self.out_dir / "summary.json", summary)
        return summary

    def _merge(self) -> tuple[int, int]:
        """predictions.jsonl := the earlier rows this run did not replace, then this run's rows."""
        with open(self.partial) as fh:
            new = [json.loads(line) for line in fh]
        rows, n_kept = merge(self.earlier, new, self.out_dir)
        merged = temp_path(self.out_dir / PREDICTIONS, ".partial")
        try:
            with open(merged, "w") as fh:
                fh.writelines(dumps(r) + "\n" for r in rows)
            merged.replace(self.out_dir / PREDICTIONS)
        finally:
            merged.unlink(missing_ok=True)
        return len(rows), n_kept
