"""A small, self-contained check of a CNN patch-kNN input geometry, run at config validation.

``image_size: 7`` used to validate and fit (a 0x0 grid padded to 1x1 at stride 8: a model that
silently localises nothing), and a tapped layer that does not exist or gives no feature map
failed only inside the fit. :func:`check_cnn_geometry` builds the
backbone with random weights (no file, no download), probes what each tap gives, and refuses,
naming the field: an unknown layer, a tap that is no feature map, taps not shallowest first,
the same tap twice, and an input (``crop``, else ``image_size``) whose patch grid at the
first tap's stride is smaller than 3x3. ``image_size: auto``, ``None`` (original size) and
tiling are checked where they are resolved (patchknn/plan.py, at fit time).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..features.backbones import FeatureExtractor
from .patchknn.params import MIN_GRID

if TYPE_CHECKING:
    from .patchcore import CNNPatchParams


def _hw(value) -> tuple[int, int] | None:
    if isinstance(value, bool) or value is None or value == "auto":
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def check_cnn_geometry(params: CNNPatchParams) -> str | None:
    """None if the geometry is usable, else one line naming the field (``detector.params.X``)."""
    backbone, layers = params.backbone, list(params.layers)
    if len(set(layers)) != len(layers):
        return f"detector.params.layers: the same layer is tapped twice ({layers})"
    try:
        extractor = FeatureExtractor(backbone, layers, None)  # random weights: only shapes matter here
    except ConfigError as exc:
        return f"detector.params.layers: {exc}"
    with torch.inference_mode():
        out = extractor.body(torch.zeros(1, 3, 64, 64))
    strides = []
    for layer in layers:
        t = out[layer]
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"detector.params.layers: {layer!r} gives no feature map (output {shape}); tap a convolutional block"
        strides.append(64 / t.shape[-1])
    if strides != sorted(strides):
        return f"detector.params.layers: taps must go shallowest first (strides {[round(s) for s in strides]} for {layers})"
    if params.tiling is not None:
        return None
    crop, size = _hw(params.crop), _hw(params.image_size)
    side, field = (crop, "crop") if crop is not None else (size, "image_size")
    if side is None:
        return None
    stride = int(round(strides[0]))
    gh, gw = side[0] // stride, side[1] // stride
    if min(gh, gw) < MIN_GRID:
        value = getattr(params, field)
        return (f"detector.params.{field}={value if isinstance(value, int) else list(value)} gives a {gh}x{gw} patch grid at "
                f"{layers[0]}'s stride {stride}: at least {MIN_GRID}x{MIN_GRID} patches are needed "
                f"({field} >= {MIN_GRID * stride})")
    return None
