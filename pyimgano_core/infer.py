"""A small inference API for inspection servers.

>>> from pyimgano_core.infer import load_model
>>> inspector = load_model("reports/my_line/part/model")       # doctest: +SKIP
>>> result = inspector.predict("incoming/0001.png")             # doctest: +SKIP
>>> result = inspector.predict(cv2.imread("incoming/0001.png"), channels="bgr")  # doctest: +SKIP
>>> result.score, result.is_anomalous, result.anomaly_map.shape, result.mask.sum()  # doctest: +SKIP

On a server without torch, after ``pyimgano export-onnx MODEL_DIR``:

>>> inspector = load_model("reports/my_line/part/model", runtime="onnx")  # doctest: +SKIP

That path (this module, the engine's scoring loop, ``deploy/onnx_runtime.py``) imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

import numpy as np

from .deploy.onnx_runtime import OnnxModel
from .deploy.runtimes import load_graph_model
from .engine import score_stream
from .errors import ConfigError, DataError
from .optional import require

Channels = Literal["rgb", "bgr"]

if TYPE_CHECKING:
    from .model import Model


@dataclass
class Inspection:
    """Result for one image. ``is_anomalous``/``mask`` are None for an uncalibrated model."""

    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None  # float32, original image size (outside the model's view: NaN)
    mask: np.ndarray | None  # bool, original image size


class Inspector:
    def __init__(self, model: Model | OnnxModel):
        self.model = model

    def predict(self, image: str | Path | np.ndarray, channels: Channels | None = None) -> Inspection:
        """Score one image: a path, or an HxWx3 uint8 array with its channel order named.

        ``channels`` is required for an array and ignored for a path: ``"bgr"`` for a frame from
        OpenCV (``cv2.imread``, ``VideoCapture.read``), ``"rgb"`` for PIL/imageio/most cameras'
        SDKs. The model was fitted on RGB; a BGR frame taken as RGB scores wrong without any error.
        """
        return next(self.predict_many([image], channels))

    def predict_many(self, images: Iterable, channels: Channels | None = None) -> Iterator[Inspection]:
        """Score images lazily, in the engine's chunks (bounded memory); ``channels``: as :meth:`predict`."""
        for s in score_stream(self.model, [as_rgb(x, channels) for x in images]):
            if s.error:
                raise DataError(s.error)
            yield self._inspection(s)

    def predict_batch(self, images: Sequence, channels: Channels | None = None) -> list[Inspection | DataError]:
        """Score up to ``engine.CHUNK`` images in one forward pass (a server's micro-batch).

        An image the model cannot use (unreadable, smaller than its patch grid) gets its
        :class:`DataError` in its place; the others are scored all the same. ``channels``: as
        :meth:`predict`.
        """
        items = [as_rgb(x, channels) for x in images]
        return [DataError(s.error) if s.error else self._inspection(s) for s in score_stream(self.model, items)]

    def _inspection(self, s) -> Inspection:
        thr = self.model.thresholds
        full = mask = None
        if s.amap is not None:
            full = np.full(s.orig_hw, np.nan, np.float32)
            full[s.region] = s.amap
            if thr is not None and thr.pixel is not None:
                mask = self.model.postprocess.binarize(np.nan_to_num(full, nan=-np.inf), thr.pixel)
        return Inspection(s.score, None if thr is None else bool(s.score >= thr.image), full, mask)


RUNTIMES = ("torch", "onnx", "openvino", "onnx-int8", "openvino-int8")
Runtime = Literal["torch", "onnx", "openvino", "onnx-int8", "openvino-int8"]


def load_for_runtime(folder: str | Path, runtime: str = "torch") -> Model | OnnxModel:
    """A saved model for the torch path (:class:`Model`), or its exported graph on another runtime
    (``deploy.runtimes``: onnxruntime or OpenVINO, fp32 or int8; no torch import)."""
    if runtime != "torch":
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
        return load_graph_model(folder, runtime)
    require("torch", extra="torch")
    from .model import Model  # torch: only on this path

    return Model.load(folder)


def as_rgb(image, channels: Channels | None):
    """A path as is; an array in RGB order, from its named ``channels`` (else a one-line error)."""
    if isinstance(image, (str, Path)):
        return image
    if channels not in ("rgb", "bgr"):
        raise ConfigError("predict(array) needs channels='rgb' or channels='bgr' (OpenCV frames, e.g. cv2.imread, are "
                          f"'bgr'); got channels={channels!r}. Paths need no channels.")
    arr = np.asarray(image)
    if channels == "bgr" and arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr[..., ::-1])
    return arr  # other shapes are refused by the engine with their own message


def load_model(folder: str | Path, runtime: Runtime = "torch") -> Inspector:
    """Load a model folder written by ``pyimgano fit`` (no code is executed while loading).

    ``runtime="onnx"`` scores with the graph written by ``pyimgano export-onnx`` on onnxruntime,
    ``"openvino"`` the same graph on OpenVINO (no torch import for either; the graph's sha256
    must match model.json); ``"onnx-int8"`` / ``"openvino-int8"`` the int8 graph written by
    ``pyimgano quantize``. Thresholds and post-processing are the same as with ``"torch"``.
    """
    return Inspector(load_for_runtime(folder, runtime))
