"""Report files: atomic JSON, per-image JSON lines, and PNG/NPY anomaly-map exports."""
from __future__ import annotations

import io
import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from . import __version__
from .outputs import write_bytes_atomic
from .overlay import colorize, render_overlay  # noqa: F401  (colorize: used by reporting.collect)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: strict JSON that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return finite_json(obj.item())
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON (no NaN/Infinity tokens): non-finite numbers become null."""
    return json.dumps(finite_json(obj), default=_default, allow_nan=False, **kw)


def _default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename): a crash never leaves half a report."""
    path = Path(path)
    _atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode())
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    _atomic_write_bytes(path, "".join(dumps(r) + "\n" for r in rows).encode())
    return path


def versions() -> dict[str, str]:
    import torch
    import torchvision

    return {
        "pyimgano": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode a BGR/grey uint8 image as PNG and write it atomically."""
    _png(path, image)


def _png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    _atomic_write_bytes(path, buf.tobytes())


def save_map_outputs(stem: Path, image_rgb: np.ndarray, amap_full: np.ndarray, vrange: tuple[float, float], mask: np.ndarray | None,
                     score: float | None = None, image_threshold: float | None = None,
                     pixel_threshold: float | None = None) -> dict[str, str]:
    """Write ``<stem>_overlay.png`` (heatmap over the image on the run's fixed scale, with a
    colour bar, the score and the defect contour; see :mod:`.overlay`), ``<stem>_map.npy``
    (raw float16 map at original resolution) and, when given, ``<stem>_mask.png`` (0/255)."""
    overlay = render_overlay(image_rgb, amap_full, vrange, mask, score, image_threshold, pixel_threshold)
    out = {"overlay": f"{stem}_overlay.png", "map": f"{stem}_map.npy"}
    _png(Path(out["overlay"]), overlay)
    buf = io.BytesIO()
    np.save(buf, amap_full.astype(np.float16))
    _atomic_write_bytes(Path(out["map"]), buf.getvalue())
    if mask is not None:
        out["mask"] = f"{stem}_mask.png"
        _png(Path(out["mask"]), mask.astype(np.uint8) * 255)
    return out
