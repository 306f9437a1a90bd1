"""The torch-free inference path: an exported model folder scored with onnxruntime + numpy/cv2.

``load_onnx_model(folder)`` reads ``model.json`` (thresholds, post-processing, the ``onnx``
section written by ``pyimgano export-onnx``), checks the graph file's sha256 and returns an
:class:`OnnxModel` that the engine scores like a torch :class:`~pyimgano_core.model.Model`:
resizing/cropping (``features/geometry.py``), mapping maps back to the original image,
post-processing and thresholds are the very same numpy code; only the network, the
nearest-neighbour search, upsampling and blur run inside the ONNX graph.

Importing this module (and running it) never imports torch: it is meant for inspection
servers with numpy, OpenCV and onnxruntime only (tests/test_onnx.py checks this).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..calibration import Thresholds
from ..model_doc import check_sha, read_model_json
from ..errors import DataError, ModelError
from ..features.geometry import Geometry
from ..optional import require
from ..postprocess import AnomalyMapPostprocess
from ..data.io import read_image

INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "map", "patch_scores")
SIMILARITY_BYTES = 1 << 28  # as KNNIndex: a (queries x memory) float32 block of ~256 MB per run


@dataclass
class OnnxPrediction:
    """The fields of ``detectors.base.Prediction`` the engine reads (that module imports torch)."""

    scores: np.ndarray
    maps: np.ndarray
    boxes: np.ndarray
    orig_hw: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class OnnxDetector:
    """An exported patch-kNN detector: ``predict(images)`` as the torch detector's, on onnxruntime."""

    def __init__(self, session, name: str, params: dict, geometry: Geometry, input_hw: tuple[int, int], batch: int = 1):
        self.session, self.name, self.params = session, name, params
        self.geometry, self.input_hw, self.batch = geometry, input_hw, max(1, int(batch))

    def _prepare(self, item) -> tuple[np.ndarray, tuple, tuple[int, int]]:
        image = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"images must be HxWx3 uint8 arrays or paths, got {image.dtype} {image.shape}")
        hw = image.shape[:2]
        x = self.geometry.apply(image)
        if x.shape[:2] != self.input_hw:
            raise DataError(f"{item if isinstance(item, (str, Path)) else 'image'} ({hw[1]}x{hw[0]}) gives a "
                            f"{x.shape[1]}x{x.shape[0]} model input but the ONNX graph takes {self.input_hw[1]}x{self.input_hw[0]} "
                            f"(resize_mode {self.geometry.mode}); export again from images of this size")
        return x, self.geometry.box(hw), hw

    def predict(self, images: Sequence, on_error: str = "raise") -> OnnxPrediction:
        """As ``Detector.predict``: an image the graph cannot take raises, or (``on_error="report"``)
        is listed in ``errors`` with a NaN score and map while the others are scored."""
        t0 = time.perf_counter()
        items, errors = [], {}
        for i, im in enumerate(images):
            try:
                items.append(self._prepare(im))
            except DataError as exc:
                if on_error == "raise":
                    raise
                errors[i] = str(exc)
                items.append(None)
        t1 = time.perf_counter()
        good = [it for it in items if it is not None]
        h, w = self.input_hw
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, h, w), np.float32)]
        x = np.stack([it[0] for it in good]) if good else np.zeros((0, h, w, 3), np.uint8)
        for s in range(0, len(x), self.batch):
            sc, mp, _ = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[s : s + self.batch]})
            scores.append(sc)
            maps.append(mp)
        t2 = time.perf_counter()
        sc, mp = np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)
        if errors:  # NaN rows where an image could not be used
            keep = np.array([it is not None for it in items])
            sc_all, mp_all = np.full(len(items), np.nan, np.float32), np.full((len(items), h, w), np.nan, np.float32)
            sc_all[keep], mp_all[keep] = sc, mp
            sc, mp = sc_all, mp_all
        fill = ((0.0, 0.0, 0.0, 0.0), (0, 0))
        return OnnxPrediction(scores=sc, maps=mp,
                              boxes=np.array([(it or (None, *fill))[1] for it in items], dtype=np.float64),
                              orig_hw=np.array([(it or (None, *fill))[2] for it in items], dtype=np.int64),
                              timing={"load_s": t1 - t0, "onnx_s": t2 - t1}, errors=errors)


@dataclass
class OnnxModel:
    """What the engine needs of a model (detector, postprocess, thresholds, meta), ONNX-backed."""

    detector: OnnxDetector
    postprocess: AnomalyMapPostprocess
    thresholds: Thresholds | None
    meta: dict[str, Any]
    onnx: dict[str, Any]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def onnx_path(folder: Path, info: dict) -> Path:
    """The graph file named in the ``onnx`` section (relative paths are inside the model folder)."""
    p = Path(info["file"])
    return p if p.is_absolute() else folder / p


def read_doc(folder: str | Path) -> dict:
    meta_path = Path(folder) / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"Not a pyimgano model folder (no model.json): {folder}")
    return read_model_json(meta_path)  # schema and sha256 (model_doc)


def session_from_bytes(data: bytes, threads: int | None = None):
    ort = require("onnxruntime", extra="onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a graph onnxruntime rejects
        raise ModelError(f"onnxruntime cannot load the graph: {str(exc).splitlines()[0]}") from None


def build_onnx_model(doc: dict, info: dict, session) -> OnnxModel:
    """An :class:`OnnxModel` from a model.json document, its ``onnx`` section and a session."""
    geometry = Geometry(**info["geometry"])
    # images per session.run: the graph's (patches x memory) distance matrix stays near SIMILARITY_BYTES
    _, h, w = info["outputs"][2]["shape"]
    batch = SIMILARITY_BYTES // max(1, h * w * int(info["memory_bank"][0]) * 4)
    det = OnnxDetector(session, doc["detector"], doc["params"], geometry, tuple(int(v) for v in info["input_hw"]), batch)
    post = AnomalyMapPostprocess.from_state(doc["postprocess"])
    thr = Thresholds(**doc["thresholds"]) if doc.get("thresholds") else None
    return OnnxModel(det, post, thr, doc.get("meta", {}), info)


def read_graph(folder: Path, info: dict) -> bytes:
    """The bytes of the graph a model.json section names, refused unless their sha256 is the recorded one."""
    path = onnx_path(folder, info)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{folder}: cannot read the graph {path} ({exc.strerror or exc})") from None
    digest = sha256_bytes(data)
    if digest != info.get("sha256"):
        raise ModelError(f"{path}: sha256 {digest[:12]}... does not match {str(info.get('sha256'))[:12]}... recorded in "
                         "model.json: the graph was changed after it was written; refusing it (export it again)")
    return data


def load_onnx_model(folder: str | Path, threads: int | None = None) -> OnnxModel:
    """Load an exported model folder for onnxruntime; refuse a graph whose sha256 differs from model.json's.

    ``threads``: onnxruntime intra-op threads (default: onnxruntime's, one per physical core).
    """
    folder = Path(folder)
    doc = read_doc(folder)
    info = doc.get("onnx")
    if not info:
        raise ModelError(f"{folder}: no ONNX graph recorded in model.json; run: pyimgano export-onnx {folder}")
    data = read_graph(folder, info)
    check_sha(doc, folder / "model.json")
    try:
        return build_onnx_model(doc, info, session_from_bytes(data, threads))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder}: model.json is incomplete for the ONNX runtime ({type(exc).__name__}: {exc})") from None
