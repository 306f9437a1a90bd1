"""The input plan: how images become model inputs (fixed resize, ``image_size: auto``, or tiles).

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
from typing import Callable, Sequence

import numpy as np

from ...errors import ConfigError, ModelError
from ...features.geometry import Geometry, auto_input_hw
from ...features.loading import iter_batches
from .params import MIN_GRID
from .tiling import check_training_sizes, describe, iter_tile_batches
from ...data.io import image_size

def image_sizes(images: Sequence) -> list[tuple[int, int]]:
    """(h, w) of each image: paths from their headers, arrays from their shapes."""
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


class InputPlan:
    """How a detector's images become model inputs, and what its fit resolved about them.

    Three rules, from the parameters: a fixed resize (``image_size``, ``resize_mode``, ``crop``),
    ``image_size: auto`` (one (h, w) resolved from the training images, kept as ``size_`` and
    ``record_``), or ``tiling`` (each tile is one input; the engine gets stitched maps).
    ``multiple`` (a callable, asked lazily: the embedder may be replaced after loading) crops
    inputs to a multiple of a ViT's patch size.
    """

    def __init__(self, params, multiple: Callable[[], int | None] | None = None):
        self.params, self.multiple = params, multiple
        self.size_: tuple[int, int] | None = None
        self.record_: dict | None = None

    @property
    def tiling(self):
        return self.params.tiling

    @property
    def geometry(self) -> Geometry:
        p = self.params
        if p.tiling is not None:  # a tile, as cut, is the model input
            return Geometry(size=p.tiling.tile, mode="squash")
        size = self.size_ if p.image_size == "auto" else p.image_size  # auto: resolved by the fit
        multiple = self.multiple() if self.multiple is not None else None
        return Geometry(size=size, crop=p.crop, mode=p.resize_mode, multiple=multiple)

    def resolve(self, images: Sequence, embedder) -> tuple[int, list | None]:
        """At the start of a fit: (model inputs to embed, the tile grids or None), before the long work."""
        p = self.params
        self.size_ = self.record_ = None
        if p.tiling is not None:
            grids = check_training_sizes(images, p.tiling)
            return sum(g.shape[0] * g.shape[1] for g in grids), grids
        if p.image_size == "auto":
            self.size_, self.record_ = resolve_auto_size(embedder, images, p.pixel_budget)
        return len(images), None

    def batches(self, images: Sequence, batch_size: int, errors: dict | None = None, grid_shape=None):
        """Model-input batches of ``images`` (tiles: ``TileBatch`` with owner and position)."""
        if self.params.tiling is None:
            return iter_batches(images, self.geometry, batch_size)
        return iter_tile_batches(images, self.params.tiling, batch_size, grid_shape, errors)

    def save(self, extras: dict) -> None:
        if self.size_ is not None:
            extras.update(image_size_=list(self.size_), auto_input_=self.record_)

    def load(self, extras: dict) -> None:
        if self.params.image_size == "auto":
            hw = extras.get("image_size_")
            if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)):
                raise ModelError(f"model has image_size: auto but no resolved size (model.json state.image_size_: {hw!r})")
            self.size_, self.record_ = (hw[0], hw[1]), dict(extras.get("auto_input_") or {})

    def describe(self, tile_grid: tuple[int, int] | None = None) -> dict | None:
        """The input rule for the report's protocol (None: a fixed image_size)."""
        if self.params.tiling is not None:
            out = describe(self.params.tiling)
            if tile_grid is not None:
                out["per_tile_grid"] = list(tile_grid)
            return out
        return dict(self.record_ or {}) or None
