"""A small inference API for inspection servers.

>>> from pyimgano_core.infer import load_model
>>> inspector = load_model("reports/my_line/part/model")       # doctest: +SKIP
>>> result = inspector.predict("incoming/0001.png")             # doctest: +SKIP
>>> result.score, result.is_anomalous, result.anomaly_map.shape, result.mask.sum()  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .engine import score_stream
from .errors import DataError
from .model import Model


@dataclass
class Inspection:
    """Result for one image. ``is_anomalous``/``mask`` are None for an uncalibrated model."""

    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None  # float32, original image size (outside the model's view: NaN)
    mask: np.ndarray | None  # bool, original image size


class Inspector:
    def __init__(self, model: Model):
        self.model = model

    def predict(self, image: str | Path | np.ndarray) -> Inspection:
        """Score one image (a path or an HxWx3 uint8 RGB array)."""
        return next(self.predict_many([image]))

    def predict_many(self, images: Iterable) -> Iterator[Inspection]:
        """Score images lazily, in the engine's chunks (bounded memory)."""
        thr = self.model.thresholds
        for s in score_stream(self.model, list(images)):
            if s.error:
                raise DataError(s.error)
            full = mask = None
            if s.amap is not None:
                full = np.full(s.orig_hw, np.nan, np.float32)
                full[s.region] = s.amap
                if thr is not None and thr.pixel is not None:
                    mask = self.model.postprocess.binarize(np.nan_to_num(full, nan=-np.inf), thr.pixel)
            yield Inspection(s.score, None if thr is None else bool(s.score >= thr.image), full, mask)


def load_model(folder: str | Path) -> Inspector:
    """Load a model folder written by ``pyimgano fit`` (no code is executed while loading)."""
    return Inspector(Model.load(folder))
