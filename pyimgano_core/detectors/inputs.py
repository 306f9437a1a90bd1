"""How training images become model inputs, decided at fit time: ``image_size: auto`` and tiling.

``image_size: auto`` resolves, from the training images' sizes (file headers, no decoding) and
``pixel_budget``, one fixed model input (h, w) whose sides are multiples of the backbone's
largest stride (:func:`~..features.geometry.auto_input_hw`). The result depends only on the
set of training image sizes, is kept as ``image_size_`` with the model, and is written into
the report's protocol (:func:`describe_input`). A budget whose patch grid (at the first tap's
stride) is smaller than 3x3 is a :class:`ConfigError` naming ``pixel_budget``, raised before
any feature is extracted.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..features.geometry import auto_input_hw

MIN_GRID = 3  # patches per side: a smaller grid leaves no neighbourhood for the 3x3 local features


def image_sizes(images: Sequence) -> list[tuple[int, int]]:
    """(h, w) of each image: paths from their headers, arrays from their shapes."""
    from ..data.io import image_size

    return [tuple(int(v) for v in (image_size(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im).shape[:2]))
            for im in images]


def backbone_strides(embedder) -> list[int]:
    """Strides of the tapped layers, shallowest first (``FeatureExtractor.strides``, probed, never hard-coded)."""
    strides = getattr(embedder, "strides", None) or getattr(getattr(embedder, "extractor", None), "strides", None)
    if not strides:
        raise ConfigError(f"detector.params.image_size: auto needs the backbone's strides, and the embedder "
                          f"({type(embedder).__name__}) does not report them (a 'strides' attribute); set image_size")
    return [int(s) for s in strides]


def resolve_auto_size(embedder, images: Sequence, pixel_budget: int) -> tuple[tuple[int, int], dict]:
    """((h, w), the record of how it was chosen) for ``image_size: auto``."""
    strides = backbone_strides(embedder)
    multiple, patch_stride = max(strides), strides[0]
    sizes = image_sizes(images)
    (h, w), aspect = auto_input_hw(sizes, pixel_budget, multiple)
    gh, gw = h // patch_stride, w // patch_stride
    if min(gh, gw) < MIN_GRID:
        raise ConfigError(
            f"detector.params.pixel_budget={pixel_budget} gives a {h}x{w} model input, a {gh}x{gw} patch grid at "
            f"stride {patch_stride}: at least {MIN_GRID}x{MIN_GRID} patches are needed; raise pixel_budget "
            f"(at least about {MIN_GRID * patch_stride * max(MIN_GRID * patch_stride, multiple) * max(aspect, 1 / aspect):.0f})")
    record = {"rule": "image_size auto", "pixel_budget": int(pixel_budget), "median_aspect_w_over_h": round(aspect, 6),
              "n_images": len(sizes), "multiple_of": multiple, "patch_stride": patch_stride, "resolved_hw": [h, w],
              "patch_grid": [gh, gw]}
    return (h, w), record


def describe_input(det) -> dict | None:
    """How this fitted detector turned images into model inputs (None: a fixed image_size rule)."""
    from .tiling import describe

    p = det.params_
    tiling = getattr(p, "tiling", None)
    if tiling is not None:
        out = describe(tiling)
        if getattr(det, "tile_grid_", None) is not None:
            out["per_tile_grid"] = list(det.tile_grid_)
        return out
    return dict(getattr(det, "auto_input_", None) or {}) or None


def prepare_inputs(det, images: Sequence) -> tuple[int, list | None]:
    """At the start of a fit: resolve ``image_size: auto`` or plan the tile grids of the training images.

    Returns (model inputs to embed, the tile grids or None); forgets what an earlier fit resolved.
    """
    from .tiling import check_training_sizes

    p = det.params_
    for name in ("image_size_", "auto_input_", "tile_grid_", "tile_offsets_"):
        det.__dict__.pop(name, None)
    det._tile_index = None
    if getattr(p, "tiling", None) is not None:
        grids = check_training_sizes(images, p.tiling)
        return sum(g.shape[0] * g.shape[1] for g in grids), grids
    if p.image_size == "auto":
        det.image_size_, det.auto_input_ = resolve_auto_size(det._embedder(), images, p.pixel_budget)
    return len(images), None


def save_inputs(det, arrays: dict, extras: dict) -> None:
    """Add what the fit resolved about inputs to a detector's saved state."""
    if getattr(det, "image_size_", None) is not None:
        extras.update(image_size_=list(det.image_size_), auto_input_=det.auto_input_)
    if getattr(det, "tile_offsets_", None) is not None:
        arrays["tile_offsets_"], extras["tile_grid_"] = det.tile_offsets_, list(det.tile_grid_)


def load_inputs(det, arrays: dict, extras: dict) -> None:
    """Restore (and check) :func:`save_inputs`'s state after the detector's ``params_`` are set."""
    from ..errors import ModelError

    p = det.params_
    if getattr(p, "image_size", None) == "auto":
        hw = extras.get("image_size_")
        if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)):
            raise ModelError(f"model has image_size: auto but no resolved size (model.json state.image_size_: {hw!r})")
        det.image_size_, det.auto_input_ = (hw[0], hw[1]), dict(extras.get("auto_input_") or {})
    tiling = getattr(p, "tiling", None)
    if tiling is not None and tiling.bank == "per_tile":
        off, grid = arrays.get("tile_offsets_"), extras.get("tile_grid_")
        n = len(det.memory_)
        if (off is None or not isinstance(grid, list) or len(grid) != 2 or off.ndim != 1 or len(off) != grid[0] * grid[1] + 1
                or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 1)):
            raise ModelError("model has tiling.bank: per_tile but its tile_offsets_ / tile_grid_ do not describe "
                             f"{n} memory entries in one bank per tile position")
        det.tile_offsets_, det.tile_grid_ = off.astype(np.int64), (int(grid[0]), int(grid[1]))
