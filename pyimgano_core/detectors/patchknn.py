"""The patch-kNN core shared by PatchCore, SoftPatch, AnomalyDINO and OpenCLIP patch kNN.

Pure helpers (aggregation, grid reshape, map upsampling, greedy coreset, kNN search) and the
:class:`PatchKNNDetector` base class that runs them: embed -> memory bank -> nearest-neighbour
patch distances -> image score + anomaly map. Detectors differ only in their embedder, in how
they build the memory bank and in how they turn neighbour distances into patch scores.
"""
from __future__ import annotations

import os
import time
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ..features.geometry import Geometry
from ..features.loading import iter_batches
from ..errors import ConfigError, DataError, ModelError
from ..optional import require
from .base import Detector, DetectorParams, Prediction
from .knn import IndexKind, KNNIndex  # noqa: F401 - KNNIndex re-exported (it lived here)

Aggregation = Literal["max", "mean", "topk_mean"]


class PatchEmbedder(Protocol):
    """Maps a batch of images (float [B, 3, h, w] in [0, 1], RGB) to patch features [B, h', w', D]."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------- pure helpers
def aggregate(patch_scores: np.ndarray, how: Aggregation = "max", topk_ratio: float = 0.01) -> np.ndarray:
    """Image scores [B] from patch scores [B, ...]: max, mean, or mean of the top ``topk_ratio``.

    ``topk_mean`` uses ``max(1, round(topk_ratio * n_patches))`` patches (AnomalyDINO: top 1%).
    """
    flat = np.asarray(patch_scores, dtype=np.float32).reshape(len(patch_scores), -1)
    if how == "max":
        return flat.max(axis=1)
    if how == "mean":
        return flat.mean(axis=1)
    if how == "topk_mean":
        k = max(1, int(round(topk_ratio * flat.shape[1])))
        return -np.sort(-flat, axis=1)[:, :k].mean(axis=1)
    raise ValueError(f"aggregation must be one of max, mean, topk_mean; got {how!r}")


def to_grid(flat: np.ndarray, batch: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Reshape per-patch values [B*h*w] (row-major per image) to [B, h, w], checking the size."""
    flat = np.asarray(flat)
    h, w = grid_hw
    if flat.ndim != 1 or flat.size != batch * h * w:
        raise ValueError(f"expected {batch}*{h}*{w}={batch * h * w} patch values, got array of shape {flat.shape}")
    return flat.reshape(batch, h, w)


def upsample(grids: np.ndarray, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Bilinear upsampling of patch grids [B, h, w] to ``size`` (H, W), then Gaussian blur.

    Bilinear with half-pixel centres (= ``F.interpolate(..., align_corners=False)``), and the
    blur like ``scipy.ndimage.gaussian_filter(sigma, truncate=4, mode="reflect")`` as in the
    PatchCore reference code, applied at model-input resolution (DESIGN: blurring at the
    original 900 px would be ~3x weaker).
    """
    H, W = size
    out = np.empty((len(grids), H, W), dtype=np.float32)
    radius = int(4.0 * sigma + 0.5)
    for i, g in enumerate(np.asarray(grids, dtype=np.float32)):
        m = cv2.resize(g, (W, H), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            m = cv2.GaussianBlur(m, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = m
    return out


def greedy_coreset(features: np.ndarray, n: int, proj_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` patches picked by greedy k-center (PatchCore, Roth et al. 2022, Alg. 1).

    Distances are computed on a Gaussian random projection to ``proj_dim`` dims (Johnson-
    Lindenstrauss, as in the paper; the reference code uses a random linear layer). The first
    center is drawn with ``seed``; every next pick is the patch farthest from all picks so far.

    Cost: one matrix-vector product per pick (numpy/BLAS). Two BLAS threads win on an idle
    machine, one thread wins (up to ~5x) when other processes share the cores, so each block of
    picks starts with a short timed probe of both and continues with the faster. Each output
    entry is computed by one thread either way, so the picks do not depend on the choice.
    """
    from threadpoolctl import threadpool_limits

    N, D = features.shape
    n = int(min(max(n, 1), N))
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(features, dtype=np.float32)
    if proj_dim and proj_dim < D:
        x = x @ (rng.standard_normal((D, proj_dim)) / np.sqrt(proj_dim)).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    # Augmented rows [-2x, 1] . [c, |c|^2] = |c|^2 - 2 x.c: with |x|^2 added, the squared distance
    xa = np.hstack([-2.0 * x, np.ones((N, 1), np.float32)])
    ca = np.empty(x.shape[1] + 1, np.float32)
    min_d = np.full(N, np.inf, np.float32)
    dist = np.empty(N, np.float32)
    picks = np.empty(n, dtype=np.int64)
    state = {"idx": int(rng.integers(N)), "i": 0}

    def run(count: int, threads: int) -> float:
        t0 = time.perf_counter()
        with threadpool_limits(limits=threads, user_api="blas"):
            for _ in range(min(count, n - state["i"])):
                idx = state["idx"]
                picks[state["i"]] = idx
                ca[:-1] = x[idx]
                ca[-1] = sq[idx]
                np.dot(xa, ca, out=dist)
                np.add(dist, sq, out=dist)
                np.minimum(min_d, dist, out=min_d)
                state["idx"], state["i"] = int(min_d.argmax()), state["i"] + 1
        return time.perf_counter() - t0

    block, probe = 4096, 32
    while state["i"] < n:
        if n - state["i"] <= 4 * probe:
            run(n, 1)
            break
        one, two = run(probe, 1), run(probe, 2)
        run(block - 2 * probe, 1 if one <= two else 2)
    return picks


# ---------------------------------------------------------------------------- base detector
class PatchKNNParams(DetectorParams):
    """Parameters shared by every patch-kNN detector (geometry, scoring, maps, search)."""

    image_size: int | tuple[int, int] = Field(256, description="resize target (squash: exact h,w; shorter_side: short edge)")
    crop: int | tuple[int, int] | None = Field(None, description="centre crop after resize (None = whole image)")
    resize_mode: Literal["squash", "shorter_side"] = "squash"
    aggregation: Aggregation = Field("max", description="image score from patch scores")
    topk_ratio: float = Field(0.01, gt=0, le=1, description="share of patches averaged by topk_mean")
    blur_sigma: float = Field(4.0, ge=0, description="Gaussian sigma (model-input pixels) applied to maps")
    knn_backend: Literal["torch", "faiss"] = Field("torch", description="engine of the exact search (knn_index: exact)")
    knn_index: IndexKind = Field("exact", description="nearest-neighbour search: exact, or approximate faiss hnsw / ivf "
                                 "(sub-linear in the bank; can only over-estimate a distance)")
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: graph links per entry")
    hnsw_ef_construction: int = Field(80, ge=8, le=4096, description="hnsw: candidate list size while building")
    hnsw_ef_search: int = Field(64, ge=1, le=4096, description="hnsw: candidate list size per query (recall vs time)")
    ivf_nlist: int | None = Field(None, ge=1, description="ivf: k-means lists (None: 4*sqrt(entries)); at most the entries")
    ivf_nprobe: int = Field(8, ge=1, description="ivf: lists visited per query (recall vs time); at most ivf_nlist")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0

    @field_validator("ivf_nprobe")
    @classmethod
    def _nprobe_within_nlist(cls, v: int, info):
        nlist = info.data.get("ivf_nlist")
        if nlist is not None and v > nlist:
            raise ValueError(f"ivf_nprobe={v} visits more lists than ivf_nlist={nlist}")
        return v

    @model_validator(mode="after")
    def _index_options_apply(self):
        # No dead options: a search parameter of another index kind would silently do nothing.
        defaults = type(self).model_fields
        for name, kind in _INDEX_OPTIONS.items():
            if kind != self.knn_index and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name} only applies to knn_index: {kind} (knn_index is {self.knn_index})")
        return self


_INDEX_OPTIONS = {"knn_backend": "exact", "hnsw_m": "hnsw", "hnsw_ef_construction": "hnsw", "hnsw_ef_search": "hnsw",
                  "ivf_nlist": "ivf", "ivf_nprobe": "ivf"}


def _check_grid(images, start: int, orig_hw: np.ndarray, grid_hw: tuple[int, int]) -> None:
    """Refuse an image smaller than the patch grid: its map would be invented by upsampling."""
    for j, (h, w) in enumerate(orig_hw):
        if h < grid_hw[0] or w < grid_hw[1]:
            item = images[start + j]
            name = item if isinstance(item, (str, os.PathLike)) else f"#{start + j}"
            raise DataError(f"image {name} is {w}x{h} px, smaller than the model's {grid_hw[1]}x{grid_hw[0]} patch grid")


class PatchKNNDetector(Detector):
    """Embed -> memory bank -> nearest-neighbour patch scores -> (image score, map).

    Subclasses implement ``_make_embedder``, ``_build_memory`` (sets ``memory_``) and may
    override ``_score_patches`` (distances -> patch scores) and ``_image_scores``.
    """

    metric: Literal["l2", "cosine"] = "l2"

    def __init__(self, embedder: PatchEmbedder | None = None, **params):
        super().__init__(**params)
        self.embedder = embedder  # injectable (tests, custom models); built from params if None

    # -- hooks ---------------------------------------------------------------------------
    def _make_embedder(self) -> PatchEmbedder:  # pragma: no cover - abstract
        raise NotImplementedError

    def _build_memory(self, features: np.ndarray, grid_hw: tuple[int, int]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _score_patches(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return dists[:, 0]

    # -- shared machinery ----------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        p = self.params_
        return Geometry(size=p.image_size, crop=p.crop, mode=p.resize_mode)

    def _embedder(self) -> PatchEmbedder:
        if self.embedder is None:
            self.embedder = self._make_embedder()
        return self.embedder

    def _embed(self, images: list, timing: dict):
        """Yield (features [B, h', w', D] float32 numpy, batch); adds load/embed seconds to ``timing``."""
        emb = self._embedder()
        p = self.params_
        batches = iter_batches(images, self.geometry, p.batch_size)
        start = 0
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            timing["load_s"] = timing.get("load_s", 0.0) + t1 - t0
            if batch is None:
                return
            with torch.inference_mode():
                feats = emb(batch.pixels.to(p.device)).float().cpu().numpy()
            if feats.ndim != 4 or len(feats) != len(batch.pixels):
                raise ValueError(f"embedder must return [B, h, w, D] features, got shape {feats.shape}")
            timing["embed_s"] = timing.get("embed_s", 0.0) + time.perf_counter() - t1
            _check_grid(images, start, batch.orig_hw, feats.shape[1:3])
            start += len(feats)
            yield feats, batch

    def _fit(self, images: list) -> None:
        chunks = [f for f, _ in self._embed(images, self.timing_)]
        grid_hw = chunks[0].shape[1:3]
        if any(c.shape[1:3] != grid_hw for c in chunks):
            raise ValueError("training images give patch grids of different sizes; use a fixed image_size (squash)")
        feats = np.concatenate(chunks).reshape(-1, chunks[0].shape[-1])  # (N*h*w, D)
        del chunks
        self._check_index_fits(len(feats))
        t0 = time.perf_counter()
        self._build_memory(feats, grid_hw)
        self.timing_["memory_s"] = time.perf_counter() - t0
        self.n_train_patches_ = int(len(feats))
        self._index = None

    def fit(self, images) -> "PatchKNNDetector":
        if self.Params.model_validate(self.params).knn_index != "exact":
            require("faiss", extra="faiss")  # before the long work
        super().fit(images)
        self._index = None
        if self.params_.knn_index != "exact":  # built now: its cost is fit time, bad sizes fail here
            t0 = time.perf_counter()
            self._knn()
            self.timing_["index_s"] = time.perf_counter() - t0
        return self

    def _check_index_fits(self, n_patches: int) -> None:
        """Fail before the memory bank is built when it cannot hold ``ivf_nlist`` lists (<= n_patches entries)."""
        p = self.params_
        if p.knn_index == "ivf" and p.ivf_nlist is not None and p.ivf_nlist > n_patches:
            raise ConfigError(f"detector.params.ivf_nlist={p.ivf_nlist} is more than the {n_patches} training patches "
                              "the memory bank is drawn from")

    def _new_index(self) -> KNNIndex:
        p = self.params_
        return KNNIndex(self.metric, p.knn_backend, p.device, p.knn_index, hnsw_m=p.hnsw_m,
                        hnsw_ef_construction=p.hnsw_ef_construction, hnsw_ef_search=p.hnsw_ef_search,
                        ivf_nlist=p.ivf_nlist, ivf_nprobe=p.ivf_nprobe)

    def _knn(self) -> KNNIndex:
        if getattr(self, "_index", None) is None:
            self._index = self._new_index().fit(self.memory_)
        return self._index

    def _predict(self, images: list) -> Prediction:
        p = self.params_
        scores, maps, boxes, hws = [], [], [], []
        timing = dict(load_s=0.0, embed_s=0.0, search_s=0.0, maps_s=0.0)
        for feats, batch in self._embed(images, timing):
            B, h, w, D = feats.shape
            t0 = time.perf_counter()
            dists, idx = self._knn().search(feats.reshape(-1, D), k=self._k())
            patch = to_grid(self._score_patches(dists, idx), B, (h, w))
            t1 = time.perf_counter()
            scores.append(self._image_scores(patch, dists, idx, feats))
            maps.extend(upsample(patch, tuple(batch.pixels.shape[-2:]), p.blur_sigma))
            boxes.append(batch.boxes)
            hws.append(batch.orig_hw)
            timing["search_s"] += t1 - t0
            timing["maps_s"] += time.perf_counter() - t1
        same = len({m.shape for m in maps}) == 1
        return Prediction(
            scores=np.concatenate(scores).astype(np.float32),
            maps=np.stack(maps) if same else maps,
            boxes=np.concatenate(boxes),
            orig_hw=np.concatenate(hws),
            timing=timing,
        )

    def _k(self) -> int:
        return 1

    def _image_scores(self, patch: np.ndarray, dists, idx, feats) -> np.ndarray:
        return aggregate(patch, self.params_.aggregation, self.params_.topk_ratio)

    # -- persistence ---------------------------------------------------------------------
    def state(self):
        self.check_fitted()
        arrays, extras = {"memory_": self.memory_}, {"n_train_patches_": self.n_train_patches_}
        if self.params_.knn_index != "exact":  # the faiss index's own bytes (no pickle), with a checksum
            arrays["knn_index_"], extras["knn_index_sha256"] = self._knn().to_array()
        return arrays, extras

    def load_state(self, arrays, extras) -> None:
        super().load_state(arrays, extras)
        self.memory_ = arrays["memory_"]
        self.n_train_patches_ = int(extras["n_train_patches_"])
        self._index = None
        if self.params_.knn_index != "exact":
            if "knn_index_" not in arrays or "knn_index_sha256" not in extras:
                raise ModelError(f"model has knn_index: {self.params_.knn_index} but no saved index (arrays.npz: knn_index_)")
            self._index = self._new_index().load_array(self.memory_, arrays["knn_index_"], extras["knn_index_sha256"])
