"""Parameters shared by every patch-kNN detector: input geometry, image score, maps, memory bank, search.

Each detector family adds only its own fields (``CNNPatchParams`` in :mod:`..patchcore`,
``FoundationPatchParams`` in :mod:`..anomalydino`). The memory bank's parts are nested
sub-models, ``coreset: {method, ratio, ...}`` (:mod:`.coreset`) and ``knn: {kind, ...}``
(:mod:`.index`), discriminated unions: an option of another method or kind is an unknown key.
Configs written for the earlier flat keys (``coreset_ratio``, ``knn_index``, ``hnsw_m``, ...)
are rewritten by :mod:`.legacy` before validation.
"""
from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from ..base import DetectorParams
from .coreset import CoresetParams, ExactCoreset
from .image_score import Aggregation
from .index import KNNParams, index_class
from .index.exact import ExactParams
from ...legacy import upgrade_flat_keys
from .tiling import Tiling

MIN_GRID = 3  # patches per side: a smaller grid leaves no neighbourhood for the 3x3 local features


class PatchKNNParams(DetectorParams):
    """Parameters shared by every patch-kNN detector (geometry, scoring, maps, memory bank, search)."""

    image_size: int | tuple[int, int] | None = Field(
        256, description="resize target (squash: exact h,w; shorter_side: short edge); null with tiling")
    crop: int | tuple[int, int] | None = Field(None, description="centre crop after resize (None = whole image)")
    resize_mode: Literal["squash", "shorter_side"] = "squash"
    aggregation: Aggregation = Field(
        "max", description="image score: max | mean | topk_mean of the patch scores, or blurred_max = max of the "
        "anomaly map (upsampled and blurred)")
    topk_ratio: float = Field(0.01, gt=0, le=1, description="share of patches averaged by topk_mean")
    topk: int | None = Field(None, ge=1, description="topk_mean: average this many patches instead of topk_ratio's share "
                             "(at most the patches of an image)")
    blur_sigma: float = Field(4.0, ge=0, description="Gaussian sigma (model-input pixels) applied to maps")
    coreset: CoresetParams = Field(default_factory=ExactCoreset, description="memory bank subsampling: method exact "
                                   "(greedy k-center) | chunked (greedy per chunk, approximate) | random; ratio kept")
    knn: KNNParams = Field(default_factory=ExactParams, description="nearest-neighbour search: kind exact (torch) | flat "
                           "(faiss exact) | hnsw | ivf | pca_ivf (faiss, approximate: sub-linear in the bank)")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    max_memory_gb: float | None = Field(
        None, gt=0, description="stop before the fit when its expected peak memory (GiB) exceeds this (None: no limit)")
    spill_dir: str | None = Field(None, description="folder for the temporary training-feature spill (None: system temp dir)")
    tiling: Tiling | None = Field(None, description="cut each image into overlapping tiles at native resolution (or "
                                  "tiling.scale); each tile is a model input, maps are stitched (None: no tiling)")

    @classmethod
    def upgrade(cls, data: dict) -> tuple[dict, list[str]]:
        """Earlier flat keys rewritten to their nested paths, and one note per key rewritten."""
        return upgrade_flat_keys(cls, data)

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_and_tiling_defaults(cls, data):
        if isinstance(data, dict):
            data, notes = upgrade_flat_keys(cls, data)
            for note in notes:  # the config loader upgrades first and prints these once; this reaches API users
                warnings.warn(note, FutureWarning, stacklevel=2)
            # tiles are fixed-size inputs cut from the image: unset image_size / crop / resize_mode default to that
            if data.get("tiling") is not None:
                data = {"image_size": None, "crop": None, "resize_mode": "squash", **data}
        return data

    def squared_distances(self) -> bool:
        """Whether patch scores are squared L2 distances (the CNN detectors' ``distance: squared``)."""
        return False

    def describe_features(self) -> str:  # pragma: no cover - each family says what its features are
        raise NotImplementedError

    @model_validator(mode="after")
    def _tiling_rules(self):
        if self.tiling is None:
            if self.image_size is None:
                raise ValueError("image_size: null only applies with tiling")
            return self
        if self.image_size is not None or self.crop is not None or self.resize_mode != "squash":
            raise ValueError("image_size, crop and resize_mode do not apply with tiling (tiles are cut from the image at "
                             "tiling.scale): remove them")
        if self.tiling.bank == "per_tile" and not index_class(self.knn.kind).exact:
            raise ValueError("tiling.bank: per_tile searches each tile position's bank exactly: use knn: {kind: exact}")
        if self.topk is not None:
            raise ValueError("topk counts the patches of one model input; with tiling the image score is taken over the "
                             "stitched map: use topk_ratio")
        return self

    @model_validator(mode="after")
    def _topk_applies(self):
        if self.topk is not None and self.aggregation != "topk_mean":
            raise ValueError(f"topk only applies to aggregation: topk_mean (aggregation is {self.aggregation})")
        if self.topk is not None and self.topk_ratio != type(self).model_fields["topk_ratio"].default:
            raise ValueError("topk and topk_ratio both set: give one of them")
        return self
