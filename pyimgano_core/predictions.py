"""The rule for a second ``export-maps`` into a folder that already holds one.

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
from pathlib import Path

from .errors import OutputError

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
