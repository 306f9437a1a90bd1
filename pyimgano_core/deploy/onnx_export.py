"""``pyimgano export-onnx``: a fitted patch-kNN model folder -> one ONNX graph, written only
when onnxruntime reproduces the torch path.

The graph (``deploy/graph.py``) takes the model input as produced by the numpy geometry (a
fixed-size RGB uint8 tensor) and returns the image score, the anomaly map at model-input size
and the patch scores. Before the file is kept, both runtimes score a few images (the model's
calibration images when they are still readable, else seeded synthetic ones) through the
engine's own ``score_stream`` (geometry, mapping back, post-processing), and the export is
refused if a score or map differs by more than ``PARITY_RTOL`` (relative; maps relative to
the torch map's largest magnitude). The graph's sha256, inputs, outputs and the parity result
are written into ``model.json`` (key ``onnx``); the ONNX runtime refuses a graph whose hash
differs.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``: the dynamo exporter
gives the same graph but is several times slower and needs onnxscript (``reports/onnx_parity.md``).
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError
from ..model_doc import seal
from ..optional import require
from ..outputs.files import write_bytes_atomic
from .onnx_runtime import INPUT_NAME, OUTPUT_NAMES, build_onnx_model, read_doc, session_from_bytes, sha256_bytes
from .support import SUPPORTED, unsupported
from ..data.io import image_size

PARITY_RTOL = 1e-4  # largest allowed |onnx - torch| / |torch| for scores; / max|torch map| for maps
N_PARITY_IMAGES = 4
DEFAULT_OPSET = 17
EXPORTABLE = tuple(SUPPORTED)
MAX_BANK_BYTES = 3 << 29  # 1.5 GiB of memory bank: room for the backbone under protobuf's 2 GiB


def _refuse(folder: Path, why: str) -> ModelError:
    return ModelError(f"{folder}: cannot export to ONNX: {why}")


def check_exportable(model, folder: Path) -> None:
    """Refuse, in one line, detector settings the graph does not implement (before any work)."""
    det = model.detector
    why = unsupported(det.name, det.params_)
    if why:
        raise _refuse(folder, why)
    if det.memory_.nbytes > MAX_BANK_BYTES:
        raise _refuse(folder, f"the memory bank ({det.memory_.nbytes / 2**30:.1f} GiB) does not fit one ONNX file "
                              "(protobuf's 2 GiB limit); use a smaller coreset_ratio")


def build_graph(model, folder: Path, input_hw: tuple[int, int]):
    """The :class:`~pyimgano_core.deploy.graph.PatchKNNGraph` of a loaded model, or a one-line refusal."""
    from ..detectors.softpatch import SoftPatch
    from ..features.patch_embed import LocalPatchEmbedder
    from ..features.vit import CNNTapEmbedder
    from .graph import CNNTapHead, LocalPatchHead, PatchKNNGraph

    det = model.detector
    p = det.params_
    emb = det._embedder()
    if isinstance(emb, LocalPatchEmbedder):
        head = LocalPatchHead(emb)
    elif isinstance(emb, CNNTapEmbedder):
        head = CNNTapHead(emb)
    else:
        raise _refuse(folder, f"backbone {p.backbone!r} ({type(emb).__name__}) is not exportable; "
                              "supported: torchvision CNN backbones (anomalydino: torchvision:<name>)")
    weights = det.memory_weights_ if isinstance(det, SoftPatch) and p.soft_weight else None
    grid = _grid_size(head, input_hw)
    return PatchKNNGraph(head, det.memory_, metric=det.metric, weights=weights, squared=det.scorer.squared,
                         aggregation=p.aggregation, k_top=topk_count(grid[0] * grid[1], p.topk_ratio), blur_sigma=p.blur_sigma,
                         input_hw=input_hw).eval()


def topk_count(n_patches: int, ratio: float) -> int:
    """How many patches ``aggregate(..., "topk_mean")`` averages, read from aggregate itself (so the
    graph follows its rounding rule): the top-k mean of one 1 among zeros is 1/k."""
    from ..detectors.patchknn import aggregate

    one_hot = np.zeros((1, n_patches), np.float32)
    one_hot[0, 0] = 1.0
    return int(round(1.0 / float(aggregate(one_hot, "topk_mean", ratio)[0])))


def _grid_size(head, input_hw) -> tuple[int, int]:
    import torch

    with torch.no_grad():
        f = head(torch.zeros(1, 3, *input_hw))
    return int(f.shape[1]), int(f.shape[2])


def parity_images(model, folder: Path) -> tuple[list, str, tuple[int, int]]:
    """(images, where they come from, model-input hw of the graph).

    The calibration (holdout) images when readable and of one model-input size; else seeded
    synthetic images, which need a size-independent geometry (squash) to define the graph size.
    """
    geo = model.detector.geometry
    found, hw0 = [], None
    for path in model.meta.get("holdout") or []:
        try:
            h, w = image_size(path)
        except (DataError, OSError):
            continue
        hw = geo.input_hw((h, w))
        hw0 = hw0 or hw
        if hw == hw0:
            found.append(path)
        if len(found) == N_PARITY_IMAGES:
            break
    if found:
        return found, "calibration images", hw0
    if geo.mode != "squash":
        raise _refuse(folder, f"resize_mode {geo.mode} gives a model input size that depends on the image, and the "
                              "model has no readable calibration images to fix it; fit with a calibration section")
    hw = geo.input_hw((1, 1))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(N_PARITY_IMAGES, 1, 1, 3))
    imgs = [np.clip(b + rng.normal(0, 40, size=(*hw, 3)), 0, 255).astype(np.uint8) for b in base]
    return imgs, "synthetic images (seeded noise; the model has no readable calibration images)", hw


def compare(torch_model, onnx_model, images) -> dict:
    """Both runtimes through the engine's score_stream: largest score/map differences, decisions."""
    from ..engine import score_stream

    # the two streams advance together: memory holds one chunk of maps per runtime
    return compare_scored(score_stream(torch_model, images), score_stream(onnx_model, images), torch_model.thresholds)


def compare_scored(ref, got, thresholds) -> dict:
    """Differences of two streams of :class:`~pyimgano_core.engine.Scored` for the same images."""
    s_abs = s_rel = m_abs = m_rel = 0.0
    flips = ties = n = flagged = 0
    for a, b in zip(ref, got, strict=True):
        n += 1
        if a.error or b.error:
            raise DataError(a.error or b.error)
        d = abs(a.score - b.score)
        s_abs, s_rel = max(s_abs, d), max(s_rel, d / max(abs(a.score), 1e-30))
        if a.amap is not None:
            if b.amap is None or b.amap.shape != a.amap.shape or b.region != a.region:
                raise ModelError(f"ONNX map geometry differs from torch's for image {a.index}")
            dm = float(np.max(np.abs(a.amap.astype(np.float64) - b.amap)))
            m_abs, m_rel = max(m_abs, dm), max(m_rel, dm / max(float(np.max(np.abs(a.amap))), 1e-30))
        if thresholds is not None:
            if (a.score >= thresholds.image) != (b.score >= thresholds.image):
                # A conformal threshold is one of the calibration scores itself: a score within the
                # parity tolerance of the threshold may land on either side; that is a tie, not a flip.
                if abs(a.score - thresholds.image) <= PARITY_RTOL * max(abs(thresholds.image), 1e-30):
                    ties += 1
                else:
                    flips += 1
            flagged += a.score >= thresholds.image
    return {"n_images": n, "max_score_abs_diff": s_abs, "max_score_rel_diff": s_rel,
            "max_map_abs_diff": m_abs, "max_map_rel_diff": m_rel,
            "decision_flips": int(flips) if thresholds is not None else None,
            "decision_ties_at_threshold": int(ties) if thresholds is not None else None,
            "n_anomalous_torch": int(flagged) if thresholds is not None else None}


def graph_io(input_hw: tuple[int, int], grid_hw: tuple[int, int]) -> dict:
    H, W = input_hw
    h, w = grid_hw
    return {
        "inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", H, W, 3],
                    "meaning": "RGB image already resized/cropped by the model geometry (numpy: features/geometry.py)"}],
        "outputs": [
            {"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": ["batch"], "meaning": "image anomaly score (compare with thresholds.image)"},
            {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": ["batch", H, W],
             "meaning": "anomaly map at model-input size (upsampled + blurred); map back with features.geometry.map_to_original"},
            {"name": OUTPUT_NAMES[2], "dtype": "float32", "shape": ["batch", h, w], "meaning": "patch scores before upsampling"},
        ],
    }


def _onnx_bytes(graph, input_hw: tuple[int, int], opset: int) -> bytes:
    import torch

    buf = io.BytesIO()
    x = torch.zeros(1, *input_hw, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUT_NAMES}})
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + rename, with the umask's permissions like every other output (not mkstemp's 0600)."""
    write_bytes_atomic(path, data)


def export_onnx(folder: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """Export the model folder's detector to ONNX after a parity check; returns the ``onnx`` section."""
    import torch

    from ..model import Model

    folder = Path(folder)
    require("onnx", extra="onnx")
    require("onnxruntime", extra="onnx")
    doc = read_doc(folder)
    if doc.get("detector") not in EXPORTABLE:  # before loading: an anomalib checkpoint needs anomalib and an opt-in
        raise _refuse(folder, unsupported(str(doc.get("detector")), None))
    if not 13 <= opset <= 20:
        raise ModelError(f"--opset {opset}: supported opsets are 13-20")
    model = Model.load(folder)
    check_exportable(model, folder)
    images, source, input_hw = parity_images(model, folder)
    graph = build_graph(model, folder, input_hw)
    data = _onnx_bytes(graph, input_hw, opset)
    out = Path(out) if out is not None else folder / "model.onnx"
    try:
        rel = out.resolve().relative_to(folder.resolve())
    except ValueError:
        rel = out.resolve()
    info = {
        "file": str(rel), "sha256": sha256_bytes(data), "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript) torch {torch.__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input_hw": list(input_hw), "geometry": model.detector.geometry.describe(), "memory_bank": list(model.detector.memory_.shape),
        **graph_io(input_hw, _grid_size(graph.head, input_hw)),
    }
    parity = compare(model, build_onnx_model(doc, info, session_from_bytes(data)), images)
    info["parity"] = {"images": source, "rtol": PARITY_RTOL, **parity}
    worst = max(parity["max_score_rel_diff"], parity["max_map_rel_diff"])
    if not worst <= PARITY_RTOL:
        raise ModelError(f"{folder}: ONNX output differs from torch beyond the tolerance {PARITY_RTOL:g} (relative) on "
                         f"{parity['n_images']} {source.split(' (')[0]}: largest score difference {parity['max_score_rel_diff']:.3g} "
                         f"(abs {parity['max_score_abs_diff']:.3g}), largest map difference {parity['max_map_rel_diff']:.3g} "
                         f"(abs {parity['max_map_abs_diff']:.3g}); nothing written")
    _write_atomic(out, data)
    doc["onnx"] = info
    _write_atomic(folder / "model.json", json.dumps(seal(doc), indent=2).encode())  # its sha256 covers the onnx section
    return info
