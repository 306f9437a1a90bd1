"""Graph runtimes for an exported model folder: onnxruntime or OpenVINO, fp32 or int8.

Every runtime scores the same way: :class:`~.onnx_runtime.OnnxDetector` prepares the input
with the numpy geometry and calls ``session.run(output_names, {"image": x})``; only the
session differs. The graph file is read once, its sha256 checked against model.json, and the
bytes handed to the runtime (no second read between check and use). No torch import.

    runtime         graph (model.json key)                   engine
    onnx            model.onnx (``onnx``)   export-onnx     onnxruntime
    openvino        model.onnx (``onnx``)                   OpenVINO (CPU plugin)
    onnx-int8       model.int8.onnx (``int8``)  quantize    onnxruntime
    openvino-int8   model.int8.onnx (``int8``)              OpenVINO
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..optional import require
from ..model_doc import check_sha
from .onnx_runtime import OnnxModel, build_onnx_model, read_doc, read_graph, session_from_bytes


class OpenVinoSession:
    """The one ``InferenceSession.run`` call OnnxDetector makes, on an OpenVINO compiled model."""

    def __init__(self, data: bytes, threads: int | None = None):
        ov = require("openvino", extra="openvino")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(io.BytesIO(data)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a graph OpenVINO rejects
            raise ModelError(f"OpenVINO cannot load the graph: {str(exc).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.outputs = {name: o for o in self.compiled.outputs for name in o.get_names()}

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        # one request object per session: OnnxDetector calls run from one thread (the model's batcher)
        res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.array(res[self.outputs[n]]) for n in names]


def graph_section(doc: dict, folder: Path, key: str) -> dict:
    info = doc.get(key)
    if not info:
        how = f"pyimgano export-onnx {folder}" if key == "onnx" else f"pyimgano quantize {folder}"
        raise ModelError(f"{folder}: no {'ONNX' if key == 'onnx' else 'int8'} graph recorded in model.json; run: {how}")
    return info


def make_session(data: bytes, engine: str, threads: int | None = None):
    if engine == "openvino":
        return OpenVinoSession(data, threads)
    return session_from_bytes(data, threads)


def load_graph_model(folder: str | Path, runtime: str, threads: int | None = None) -> OnnxModel:
    """An exported model folder on ``runtime`` (see the module table); refused in one line when the
    graph is missing, changed since it was written, or the runtime's package is not installed."""
    folder = Path(folder)
    engine, _, precision = runtime.partition("-")
    doc = read_doc(folder)
    onnx_info = graph_section(doc, folder, "onnx")
    info = onnx_info if not precision else {**onnx_info, **graph_section(doc, folder, "int8")}
    data = read_graph(folder, info)
    check_sha(doc, folder / "model.json")  # the section read above is the one sealed
    try:
        return build_onnx_model(doc, info, make_session(data, engine, threads))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder}: model.json is incomplete for the {runtime} runtime ({type(exc).__name__}: {exc})") from None
