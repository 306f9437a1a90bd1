"""The served models: named, loaded and warmed in the background, each behind its own batcher.

Specs are checked before the server listens (a missing folder, a folder without a graph for
the chosen runtime, two models of one name: one line, exit non-zero); loading and warm-up run
after it listens, so ``/healthz`` answers at once and ``/readyz`` turns 200 when every model
has scored a first image.
"""
from __future__ import annotations

import base64
import threading
from functools import partial
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..data.io import read_image
from ..deploy.onnx_runtime import read_doc
from ..errors import ConfigError, DataError, ModelError
from ..infer import RUNTIMES, Inspection, Inspector, load_model
from ..outputs.pictures import display_range, render_overlay
from .batcher import MicroBatcher
from .metrics import ServeMetrics
from .options import BatchSettings


class NotReady(Exception):
    """The models are still loading (or failed to load)."""


class UnknownModel(Exception):
    pass


def parse_specs(specs: Sequence[str], runtime: str) -> list[tuple[str, Path]]:
    """``NAME=DIR`` or ``DIR`` (named by the model's category) -> [(name, folder)], checked."""
    if not specs:
        raise ConfigError("serve needs at least one --model DIR")
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = "", spec
        folder_path = Path(folder)
        doc = read_doc(folder_path)  # ModelError: not a model folder
        if runtime != "torch" and not doc.get("onnx" if "int8" not in runtime else "int8"):
            how = "export-onnx" if "int8" not in runtime else "quantize"
            raise ModelError(f"{folder_path}: --runtime {runtime} needs the graph from 'pyimgano {how} {folder_path}'")
        name = name or str((doc.get("meta") or {}).get("category") or folder_path.name)
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"model name {name!r}: use letters, digits, '-', '_' or '.' (--model NAME=DIR)")
        if name in out:
            raise ConfigError(f"two models named {name!r} ({out[name]} and {folder_path}); name them: --model NAME=DIR")
        out[name] = folder_path
    return list(out.items())


def png_b64(image: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode()


@dataclass
class ServedModel:
    name: str
    folder: Path
    runtime: str
    inspector: Inspector
    batcher: MicroBatcher
    loaded_s: float

    @property
    def thresholds(self):
        return self.inspector.model.thresholds

    def info(self) -> dict:
        m, thr = self.inspector.model, self.thresholds
        return {"name": self.name, "folder": str(self.folder), "runtime": self.runtime, "detector": m.detector.name,
                "image_threshold": None if thr is None else thr.image, "pixel_threshold": None if thr is None else thr.pixel,
                "calibrated": thr is not None, "load_s": round(self.loaded_s, 3)}

    def answer(self, image: np.ndarray, r: Inspection, map_kind: str | None) -> dict:
        """The JSON body of one scored image (and, on request, its overlay or mask as base64 PNG)."""
        thr = self.thresholds
        out = {"model": self.name, "score": r.score, "is_anomalous": r.is_anomalous,
               "threshold": None if thr is None else thr.image, "width": int(image.shape[1]), "height": int(image.shape[0]),
               "defect_area_px": None if r.mask is None else int(r.mask.sum())}
        if map_kind == "overlay" and r.anomaly_map is not None:
            lo, hi = display_range(self.inspector.model) or (float(np.nanmin(r.anomaly_map)), float(np.nanmax(r.anomaly_map)))
            full = np.nan_to_num(r.anomaly_map, nan=lo)  # outside the model's view: bottom of the scale
            out["overlay_png"] = png_b64(render_overlay(image, full, (lo, hi), r.mask, r.score,
                                                        None if thr is None else thr.image, None if thr is None else thr.pixel))
        elif map_kind == "mask":
            if r.mask is None:
                raise DataError(f"model {self.name!r} has no pixel threshold (fit it with a calibration section); ask for map=png")
            out["mask_png"] = png_b64(r.mask.astype(np.uint8) * 255)
        return out


@dataclass
class ModelPool:
    specs: list[tuple[str, Path]]
    runtime: str
    batching: BatchSettings
    metrics: ServeMetrics
    models: dict[str, ServedModel] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None

    def start(self) -> None:
        threading.Thread(target=self._load_all, name="pyimgano-load", daemon=True).start()

    def _load_all(self) -> None:
        try:
            for name, folder in self.specs:
                self.models[name] = self._load(name, folder)
            self.ready_s = time.monotonic() - self.started_at
            self.metrics.ready.set(1)
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the server loop, in one line
            self.failed = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ModelError, DataError, ConfigError)) else str(exc)

    def _load(self, name: str, folder: Path) -> ServedModel:
        t0 = time.perf_counter()
        inspector = load_model(folder, runtime=self.runtime)
        warm = warmup_image(inspector)
        for _ in range(2):  # first pass allocates; the second runs as a request will
            inspector.predict_batch([warm], channels="rgb")
        b = self.batching
        batcher = MicroBatcher(partial(inspector.predict_batch, channels="rgb"), b.max_batch, b.max_wait_ms / 1000.0, b.max_queue, name,
                               on_batch=self.metrics.batch.labels(model=name).observe)
        self.metrics.watch_queue(name, batcher.depth)
        return ServedModel(name, folder, self.runtime, inspector, batcher, time.perf_counter() - t0)

    def get(self, name: str | None) -> ServedModel:
        if name is not None and name not in dict(self.specs):
            raise UnknownModel(f"unknown model {name!r}; this server has: {', '.join(n for n, _ in self.specs)}")
        if not self.ready.is_set():
            raise NotReady(f"the models failed to load: {self.failed}" if self.failed else
                           "the models are still loading; retry when /readyz answers 200")
        return self.models[name or self.specs[0][0]]

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish every queued image, then stop the batchers."""
        for m in list(self.models.values()):
            m.batcher.close(timeout)


def warmup_image(inspector: Inspector) -> np.ndarray:
    """A first image for the model: its first readable calibration image, else mid-grey noise."""
    for path in (inspector.model.meta or {}).get("holdout") or []:
        try:
            return read_image(path)
        except DataError:
            continue
    onnx = getattr(inspector.model, "onnx", None)
    h, w = onnx["input_hw"] if onnx else (256, 256)
    rng = np.random.default_rng(0)
    return np.clip(128 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
