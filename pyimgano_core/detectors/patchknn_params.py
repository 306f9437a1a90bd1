"""Parameters shared by every patch-kNN detector: geometry, tiles, image score, maps, search, resources.

Lives apart from the detector machinery (:mod:`.patchknn`) so that each detector family adds only
its own fields (``CNNPatchParams`` in :mod:`.patchcore`, ``FoundationPatchParams`` in
:mod:`.anomalydino`). The tiling input rule (:mod:`.tiling`) is part of the core: every patch-kNN
detector takes ``tiling`` and the same rules about which options it replaces.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import DetectorParams
from .image_score import Aggregation
from .knn import IndexKind
from .tiling import Tiling


class PatchKNNParams(DetectorParams):
    """Parameters shared by every patch-kNN detector (geometry, scoring, maps, search)."""

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
    knn_backend: Literal["torch", "faiss"] = Field("torch", description="engine of the exact search (knn_index: exact)")
    knn_index: IndexKind = Field("exact", description="nearest-neighbour search: exact, or approximate faiss hnsw / ivf / "
                                 "pca_ivf (sub-linear in the bank; can only over-estimate a distance)")
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: graph links per entry")
    hnsw_ef_construction: int = Field(80, ge=8, le=4096, description="hnsw: candidate list size while building")
    hnsw_ef_search: int = Field(64, ge=1, le=4096, description="hnsw: candidate list size per query (recall vs time)")
    ivf_nlist: int | None = Field(None, ge=1, description="ivf, pca_ivf: k-means lists (None: 4*sqrt(entries)); at most the entries")
    ivf_nprobe: int = Field(8, ge=1, description="ivf, pca_ivf: lists visited per query (recall vs time); at most ivf_nlist")
    pca_dim: int = Field(64, ge=1, description="pca_ivf: dimensions of the coarse (candidate) search; at most the feature dimension")
    rerank_candidates: int = Field(16, ge=1, le=4096, description="pca_ivf: candidates per patch re-ranked by their exact "
                                   "full-dimensional distance (recall vs time)")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    max_memory_gb: float | None = Field(
        None, gt=0, description="stop before the fit when its expected peak memory (GiB) exceeds this (None: no limit)")
    spill_dir: str | None = Field(None, description="folder for the temporary training-feature spill (None: system temp dir)")
    tiling: Tiling | None = Field(None, description="cut each image into overlapping tiles at native resolution (or "
                                  "tiling.scale); each tile is a model input, maps are stitched (None: no tiling)")

    @model_validator(mode="before")
    @classmethod
    def _tiling_defaults(cls, data):
        # tiles are fixed-size inputs cut from the image: unset image_size / crop / resize_mode default to that
        if isinstance(data, dict) and data.get("tiling") is not None:
            data = {"image_size": None, "crop": None, "resize_mode": "squash", **data}
        return data

    @model_validator(mode="after")
    def _tiling_rules(self):
        if self.tiling is None:
            if self.image_size is None:
                raise ValueError("image_size: null only applies with tiling")
            return self
        if self.image_size is not None or self.crop is not None or self.resize_mode != "squash":
            raise ValueError("image_size, crop and resize_mode do not apply with tiling (tiles are cut from the image at "
                             "tiling.scale): remove them")
        if self.tiling.bank == "per_tile" and self.knn_index != "exact":
            raise ValueError("tiling.bank: per_tile searches each tile position's bank exactly: use knn_index: exact")
        if self.topk is not None:
            raise ValueError("topk counts the patches of one model input; with tiling the image score is taken over the "
                             "stitched map: use topk_ratio")
        return self

    @field_validator("ivf_nprobe")
    @classmethod
    def _nprobe_within_nlist(cls, v: int, info):
        nlist = info.data.get("ivf_nlist")
        if nlist is not None and v > nlist:
            raise ValueError(f"ivf_nprobe={v} visits more lists than ivf_nlist={nlist}")
        return v

    @model_validator(mode="after")
    def _topk_applies(self):
        if self.topk is not None and self.aggregation != "topk_mean":
            raise ValueError(f"topk only applies to aggregation: topk_mean (aggregation is {self.aggregation})")
        if self.topk is not None and self.topk_ratio != type(self).model_fields["topk_ratio"].default:
            raise ValueError("topk and topk_ratio both set: give one of them")
        return self

    @model_validator(mode="after")
    def _index_options_apply(self):
        # No dead options: a search parameter of another index kind would silently do nothing.
        defaults = type(self).model_fields
        for name, kinds in _INDEX_OPTIONS.items():
            if self.knn_index not in kinds and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name} only applies to knn_index: {' / '.join(kinds)} (knn_index is {self.knn_index})")
        return self


_INDEX_OPTIONS = {"knn_backend": ("exact",), "hnsw_m": ("hnsw",), "hnsw_ef_construction": ("hnsw",),
                  "hnsw_ef_search": ("hnsw",), "ivf_nlist": ("ivf", "pca_ivf"), "ivf_nprobe": ("ivf", "pca_ivf"),
                  "pca_dim": ("pca_ivf",), "rerank_candidates": ("pca_ivf",)}
