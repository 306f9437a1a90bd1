"""What the ONNX graph reproduces: an explicit whitelist of detector parameters and their values.

``export-onnx`` refuses, in one line and before any work, a model whose parameters the graph
(``deploy/graph.py``) does not implement. Every parameter of an exportable detector is listed
here with the values the graph reproduces:

* ``ANY``: every value is reproduced (it only shapes the fit: coreset, noise scoring,
  reference augmentation; or it is numpy geometry outside the graph; or it cannot change a
  prediction: batch size, seed, memory limit);
* a tuple: only these values;
* a function ``params -> reason | None`` for conditions that span parameters.

A parameter this table does not know (an option added after it) is exported only at its
default value, so a new option is refused unless someone adds it here together with its graph
implementation and a parity test (tests/test_onnx.py). The parity check of ``export-onnx``
stays the second line of defence: it refuses to write a graph whose output differs.
"""
from __future__ import annotations

from typing import Any, Callable

from ..detectors.patchknn.index import index_class

ANY = "any"
Rule = Any  # ANY | tuple of allowed values | Callable[[params], str | None]


def _pixel_size(name: str) -> Callable:
    def rule(p) -> str | None:
        v = getattr(p, name)
        # crop: None = whole image; image_size auto: a fixed size the fit resolved (the detector's geometry)
        # image_size None: tiles (the "tiling" rule gives that refusal its own reason)
        ok = v is None if name == "crop" else (v == "auto" or (v is None and p.tiling is not None))
        ok = ok or isinstance(v, int) or (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v))
        return None if ok else f"{name} {v!r}: the graph takes a fixed pixel size (an int, [h, w] or auto)"
    return rule


def _exact_search(p) -> str | None:
    # every kind that returns the true nearest entries (torch, faiss flat) is what the graph's matmul + reduce computes
    if index_class(p.knn.kind).exact:
        return None
    return f"knn.kind {p.knn.kind!r}: the graph searches exactly; export a model fitted with knn.kind: exact"


def _masking_off(p) -> str | None:
    if p.masking_on():
        return (f"masking {p.masking!r} (per-image PCA of the patch tokens) is not in the graph; use masking: false "
                "(or reference on a category the reference does not mask)")
    return None


# Shared by every patch-kNN detector (PatchKNNParams). A name a detector's parameters lack is ignored.
_PATCH_KNN: dict[str, Rule] = {
    "image_size": _pixel_size("image_size"), "crop": _pixel_size("crop"), "resize_mode": ANY,
    "pixel_budget": ANY,  # image_size auto: shapes only the size the fit resolves
    "tiling": (None,),
    "aggregation": ("max", "mean", "topk_mean"), "topk_ratio": ANY, "topk": (None,), "blur_sigma": ANY,
    "knn": _exact_search,
    "coreset": ANY,  # shapes only the fit (which rows the memory bank holds)
    "batch_size": ANY, "device": ANY, "seed": ANY, "max_memory_gb": ANY, "spill_dir": ANY,
}
# PatchCore / SoftPatch backbone and locally aware patch features (CNNPatchParams); build_graph
# checks that the embedder is the one deploy/graph.py re-states (LocalPatchEmbedder).
_CNN: dict[str, Rule] = {
    **_PATCH_KNN, "backbone": ANY, "layers": ANY, "weights": ANY,
    "distance": ("euclidean", "squared"), "patch_size": ANY, "pretrain_embed_dim": ANY, "target_embed_dim": ANY,
    "feature_aggregation": ("reference",), "layer_weights": (None,),
}
SUPPORTED: dict[str, dict[str, Rule]] = {
    # reweight_neighbors 1 is the plain max (patchcore.py); b > 1 is paper eq. 7, not in the graph
    "patchcore": {**_CNN, "reweight_neighbors": (None, 1), "rotations": ANY},  # rotations: fit-time copies only
    "softpatch": {**_CNN, "noise_discriminator": ANY, "threshold": ANY, "lof_k": ANY, "noise_projection_dim": ANY,
                  "soft_weight": (True, False)},
    # CNN stand-in only (build_graph checks the embedder: torchvision:<name>)
    "anomalydino": {**_PATCH_KNN, "backbone": ANY, "weights": ANY, "layers": ANY, "patch_multiple": ANY,
                    "masking": _masking_off, "mask_reference": ANY, "mask_threshold": ANY, "mask_morphology": ANY,
                    "blur_at": ("input",), "category": ANY, "rotation": ANY},
}
# Refusals that say what to use instead ({value} is the refused value).
HINTS = {
    "reweight_neighbors": "patchcore reweight_neighbors {value} (paper eq. 7) is not in the graph; use reweight_neighbors: null",
    "blur_at": "blur_at {value!r}: the graph blurs at the model input size; use blur_at: input",
    "aggregation": "aggregation {value} is not in the graph; use aggregation max, mean or topk_mean with topk_ratio",
    "topk": "topk is not in the graph; use aggregation max, mean or topk_mean with topk_ratio",
    "feature_aggregation": "feature_aggregation {value!r} is not in the graph; use feature_aggregation: reference",
    "tiling": "tiling (tiles cut, scored and stitched per image) is not in the graph; export a model fitted without tiling",
}


def unsupported(detector: str, params) -> str | None:
    """Why the graph cannot reproduce ``params`` of ``detector`` (one line), or None when it can."""
    table = SUPPORTED.get(detector)
    if table is None:
        extra = "; an anomalib model exports with anomalib's own exporter" if detector == "anomalib_checkpoint" else ""
        return f"detector {detector!r} is not supported (export-onnx handles {', '.join(SUPPORTED)}){extra}"
    fields = type(params).model_fields
    for name, field in fields.items():
        value = getattr(params, name)
        rule = table.get(name)
        if rule is None:
            default = field.get_default(call_default_factory=True)
            if value != default:
                return (f"detector.params.{name}={value!r} is an option the ONNX graph does not implement "
                        f"(only its default {default!r} is exported)")
        elif callable(rule):
            why = rule(params)
            if why:
                return why
        elif rule != ANY and value not in rule:
            allowed = ", ".join(repr(v) for v in rule)
            return HINTS.get(name, "{name} {value!r} is not in the graph (it implements {allowed})").format(
                name=name, value=value, allowed=allowed)
    return None
