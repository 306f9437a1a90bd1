"""``pyimgano quantize``: an int8 copy of the exported graph's backbone, kept only when it holds.

The backbone convolutions of ``model.onnx`` (written by ``export-onnx``) are quantised with
onnxruntime's static quantisation (QDQ; 8-bit weights per output channel, 8-bit activations
whose ranges come from the model's calibration images). Everything after the backbone (patch
aggregation, the exact nearest-neighbour search over the memory bank, upsampling, blur, the
image score) stays float32. The int8 graph runs on onnxruntime (``--runtime onnx-int8``) and
OpenVINO (``--runtime openvino-int8``), both reading the same file.

Parity, as ``export-onnx`` but against the float32 graph (itself within 1e-4 of torch) and with
a stated looser tolerance: on the calibration images every score within ``INT8_SCORE_RTOL``,
every map within ``INT8_MAP_RTOL`` of the largest float32 map value, and no decision flipped
(a score within the tolerance of the threshold counts as a tie); otherwise nothing is written.
The calibration images also set the activation ranges, so that check is on seen images; the
benchmark (benchmarks/bench_serve.py) counts flips on bottle's whole test set.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..data.io import read_image
from ..errors import DataError, ModelError
from ..optional import require
from ..model_doc import seal
from ..outputs.files import dumps, write_bytes_atomic
from .onnx_export import N_PARITY_IMAGES, compare
from .onnx_runtime import build_onnx_model, read_doc, read_graph, session_from_bytes, sha256_bytes
from .runtimes import graph_section

INT8_SCORE_RTOL = 0.05
INT8_MAP_RTOL = 0.10
MAX_CALIBRATION_IMAGES = 32


def calibration_inputs(model, folder: Path) -> tuple[list[str], list[np.ndarray]]:
    """The readable calibration images of one model-input size, and their graph inputs."""
    geo, hw = model.detector.geometry, tuple(model.detector.input_hw)
    paths, inputs = [], []
    for p in (model.meta or {}).get("holdout") or []:
        try:
            x = geo.apply(read_image(p))
        except DataError:
            continue
        if x.shape[:2] == hw:
            paths.append(p)
            inputs.append(x)
        if len(paths) == MAX_CALIBRATION_IMAGES:
            break
    if len(paths) < N_PARITY_IMAGES:
        raise ModelError(f"{folder}: int8 quantisation needs at least {N_PARITY_IMAGES} readable calibration images "
                         f"(fit with a calibration section); found {len(paths)}")
    return paths, inputs


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared inputs."""

    def __init__(self, inputs: list[np.ndarray]):
        self.items = iter([{"image": x[None]} for x in inputs])

    def get_next(self):
        return next(self.items, None)


def backbone_convs(graph) -> list[str]:
    """Names of the backbone's Conv nodes (under /head/: the blur after upsampling is a Conv too and stays float)."""
    return [n.name for n in graph.graph.node if n.op_type == "Conv" and n.name.startswith("/head/")]


def int8_graph(folder: str | Path) -> tuple[bytes, dict, object, object, list[str]]:
    """(int8 graph bytes, its model.json section without parity, float32 model, int8 model, calibration
    images): the quantised graph, nothing checked or written (``quantize_int8`` gates it)."""
    onnx = require("onnx", extra="onnx")
    require("onnxruntime", extra="onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    folder = Path(folder)
    doc = read_doc(folder)
    info = graph_section(doc, folder, "onnx")
    data = read_graph(folder, info)
    fp32 = build_onnx_model(doc, info, session_from_bytes(data))
    paths, inputs = calibration_inputs(fp32, folder)
    graph = onnx.load_from_string(data)
    convs = backbone_convs(graph)
    with tempfile.TemporaryDirectory(prefix="pyimgano-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        logging.disable(logging.WARNING)  # onnxruntime.quantization logs advice per node on the root logger
        try:
            # uint8 weights and activations: this repo's 2-core CPU has AVX2 without VNNI, where int8
            # weights saturate onnxruntime's u8s8 kernels (score error 3.9x measured) and OpenVINO's
            quantize_static(graph, out, _Reader(inputs), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                            nodes_to_quantize=convs, per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.disable(logging.NOTSET)
        int8 = out.read_bytes()
    section = {"file": "model.int8.onnx", "sha256": sha256_bytes(int8),
               "method": f"onnxruntime quantize_static (QDQ; {len(convs)} backbone Conv nodes: uint8 weights per channel, uint8 "
                         "activations, MinMax ranges); search, upsampling, blur and score in float32",
               "calibration_images": len(paths),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return int8, section, fp32, build_onnx_model(doc, {**info, **section}, session_from_bytes(int8)), paths


def quantize_int8(folder: str | Path) -> dict:
    """Write ``model.int8.onnx`` next to ``model.onnx`` after the parity check; returns the ``int8`` section."""
    folder = Path(folder)
    int8, section, fp32, q, paths = int8_graph(folder)
    parity = compare(fp32, q, paths)
    section["parity"] = {"reference": "float32 graph (model.onnx)", "images": "calibration images",
                         "score_rtol": INT8_SCORE_RTOL, "map_rtol": INT8_MAP_RTOL, **parity}
    flips = parity["decision_flips"] or 0
    if parity["max_score_rel_diff"] > INT8_SCORE_RTOL or parity["max_map_rel_diff"] > INT8_MAP_RTOL or flips:
        raise ModelError(f"{folder}: the int8 graph differs from float32 beyond the tolerance (scores {INT8_SCORE_RTOL:g}, maps "
                         f"{INT8_MAP_RTOL:g}, relative; no decision flips) on {parity['n_images']} calibration images: largest "
                         f"score difference {parity['max_score_rel_diff']:.3g}, map {parity['max_map_rel_diff']:.3g}, "
                         f"{flips} decision flip(s); nothing written")
    doc = read_doc(folder)
    write_bytes_atomic(folder / section["file"], int8)
    doc["int8"] = section
    # strict JSON (a non-finite tolerance becomes null) and sealed again: its sha256 covers the int8 section
    write_bytes_atomic(folder / "model.json", dumps(seal(json.loads(dumps(doc))), indent=2).encode())
    return section
