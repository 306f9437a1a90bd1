"""The patch-kNN core shared by PatchCore, SoftPatch, AnomalyDINO and OpenCLIP patch kNN.

Pure helpers (aggregation, grid reshape, map upsampling, kNN search; the greedy coreset lives
in :mod:`.coreset`) and the :class:`PatchKNNDetector` base class that runs them: embed -> memory
bank -> nearest-neighbour patch distances -> image score + anomaly map. Detectors differ only in
their embedder, in how they build the memory bank and in how they turn neighbour distances into
patch scores. Training features go through a disk-backed :class:`~..features.store.FeatureStore`
(bounded memory), with an up-front memory estimate checked against ``max_memory_gb``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Literal, Protocol, Sequence

import cv2
import numpy as np
import torch

from ..errors import ConfigError, DataError, ModelError, ResourceError
from ..features.geometry import Geometry
from ..features.loading import iter_batches
from ..features.store import FeatureStore
from ..optional import require
from .base import Detector, Prediction
from .coreset import CoresetMethod, greedy_coreset  # noqa: F401  (CoresetMethod, greedy_coreset: re-exported)
from .image_score import Aggregation, aggregate, describe_rule  # noqa: F401  (Aggregation, aggregate: re-exported)
from .inputs import describe_input, load_inputs, prepare_inputs, save_inputs
from .knn import KNNIndex
from .patchknn_params import PatchKNNParams  # noqa: F401 - re-exported (it lived here)
from .tiling import fit_per_tile, iter_tile_batches, predict_tiled

log = logging.getLogger(__name__)
FitProgress = Callable[[str, int, "int | None"], None]  # (stage, done, total)


class PatchEmbedder(Protocol):
    """Maps a batch of images (float [B, 3, h, w] in [0, 1], RGB) to patch features [B, h', w', D]."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------- pure helpers
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


def _current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- base detector
def _check_grid(images, start: int, orig_hw: np.ndarray, grid_hw: tuple[int, int], errors: dict | None) -> None:
    """Refuse an image smaller than the patch grid: its map would be invented by upsampling.

    ``errors`` (predict): the reason is recorded under the image's index and the batch goes on;
    None (fit): the first such image raises."""
    for j, (h, w) in enumerate(orig_hw):
        if h < grid_hw[0] or w < grid_hw[1]:
            item = images[start + j]
            name = item if isinstance(item, (str, os.PathLike)) else f"#{start + j}"
            msg = f"image {name} is {w}x{h} px, smaller than the model's {grid_hw[1]}x{grid_hw[0]} patch grid"
            if errors is None:
                raise DataError(msg)
            errors[start + j] = msg


class PatchKNNDetector(Detector):
    """Embed -> memory bank -> nearest-neighbour patch scores -> (image score, map).

    Subclasses implement ``_make_embedder``, ``_build_memory`` (sets ``memory_``) and may
    override ``_score_patches`` (distances -> patch scores) and ``_image_scores``.
    """

    metric: Literal["l2", "cosine"] = "l2"
    fit_progress: FitProgress | None = None  # set by the caller (the engine's progress bar); never prints

    def __init__(self, embedder: PatchEmbedder | None = None, **params):
        super().__init__(**params)
        self.embedder = embedder  # injectable (tests, custom models); built from params if None

    # -- hooks ---------------------------------------------------------------------------
    def _make_embedder(self) -> PatchEmbedder:  # pragma: no cover - abstract
        raise NotImplementedError

    def _build_memory(self, features: FeatureStore, grid_hw: tuple[int, int] | None) -> None:  # pragma: no cover
        """Set ``memory_`` from the training features (row ranges / gathered rows of ``features``)."""
        raise NotImplementedError

    def _score_patches(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return dists[:, 0]

    # -- shared machinery ----------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        p = self.params_
        if getattr(p, "tiling", None) is not None:  # a tile, as cut, is the model input (tiling.py)
            return Geometry(size=p.tiling.tile, mode="squash")
        size = self.image_size_ if p.image_size == "auto" else p.image_size  # auto: resolved by the fit
        return Geometry(size=size, crop=p.crop, mode=p.resize_mode)

    def _batches(self, images: list, errors: dict | None = None):
        p = self.params_
        if getattr(p, "tiling", None) is None:
            return iter_batches(images, self.geometry, p.batch_size)
        return iter_tile_batches(images, p.tiling, p.batch_size, getattr(self, "tile_grid_", None), errors)


    def _embedder(self) -> PatchEmbedder:
        if self.embedder is None:
            self.embedder = self._make_embedder()
        return self.embedder

    def _embed(self, images: list, timing: dict, errors: dict | None = None):
        """Yield (features [B, h', w', D] float32 numpy, batch); adds load/embed seconds to ``timing``.

        ``errors`` (predict): images that cannot be scored are recorded there (index -> reason) instead
        of raising; untiled, such an image is still in its batch (its rows are ignored by the caller)."""
        emb = self._embedder()
        p = self.params_
        batches = self._batches(images, errors)
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
            if getattr(p, "tiling", None) is None:
                _check_grid(images, start, batch.orig_hw, feats.shape[1:3], errors)
            start += len(feats)
            yield feats, batch

    def _references(self, images: list) -> tuple[Sequence, Callable | None]:
        """The model inputs the memory is built from, and ``transform(feats, batch) -> rows`` (None: every row as is).

        AnomalyDINO: rotated copies of each image (same size), L2-normalised rows.
        """
        return images, None

    def _fit(self, images: list) -> None:
        n_inputs, grids = prepare_inputs(self, images)  # image_size auto / tile grids, before the long work
        refs, transform = self._references(images)
        copies = len(refs) // max(1, len(images))  # augmented copies keep each image's size (and tile grid)
        n_inputs, grids = n_inputs * copies, grids and [g for g in grids for _ in range(copies)]
        if grids and self.params_.tiling.bank == "per_tile":
            fit_per_tile(self, refs, grids, transform)
            self._index = self._tile_index = None
            return
        self._fit_spilled(refs, transform=transform, n_inputs=n_inputs)

    def _fit_spilled(self, images, transform=None, n_inputs: int | None = None) -> None:
        """Spill the training features (``_spill``), build the memory bank from them, remove the spill."""
        with FeatureStore(self.params_.spill_dir) as store:
            grid_hw = self._spill(images, store, transform=transform, n_inputs=n_inputs)
            self._check_index_fits(len(store))
            t0 = time.perf_counter()
            self._build_memory(store, grid_hw)
            self.timing_["memory_s"] = time.perf_counter() - t0
            self.n_train_patches_ = int(len(store))
            self.timing_["spill"] = store.describe()
        self.timing_["spill"]["removed"] = store.removed
        self._index = None

    def _spill(self, images: list, store: FeatureStore, transform=None, n_inputs: int | None = None) -> tuple[int, int] | None:
        """Extract features of ``images`` in batches into ``store``; returns the patch grid (None if it varies).

        After the first batch the fit's memory is estimated from the number of patches it
        implies (and checked against ``max_memory_gb``) before the rest is extracted.
        ``transform(feats [B, h, w, D], batch) -> rows [n, D]`` selects/normalises rows.
        ``n_inputs``: the model inputs ``images`` give (tiles; default one per image).
        """
        total = len(images) if n_inputs is None else n_inputs
        grid_hw, seen, stage = None, 0, "extracting features"
        for feats, batch in self._embed(images, self.timing_):
            if seen == 0:
                grid_hw = feats.shape[1:3]
                self._check_topk(grid_hw)
            elif grid_hw is not None and feats.shape[1:3] != grid_hw:
                if transform is None:
                    raise ValueError("training images give patch grids of different sizes; use a fixed image_size (squash)")
                grid_hw = None
            rows = feats.reshape(-1, feats.shape[-1]) if transform is None else transform(feats, batch)
            if seen == 0:
                est = self._check_memory(int(round(len(rows) * total / len(feats))), rows.shape[-1])
                stage = (f"features: {est['patches']:,} patches, memory bank {est['memory_bank_bytes'] / 2**30:.2f} GiB, "
                         f"expected peak {est['expected_peak_gib']:.1f} GiB")
            store.append(rows)
            seen += len(feats)
            self._report(stage, seen, total)
        return grid_hw

    # -- resources and progress ----------------------------------------------------------
    def _memory_needs(self, n_patches: int, dim: int) -> dict[str, int]:
        """Bytes of the fit's large arrays by stage (the memory bank, the coreset search).

        Full training features are never all in memory (they are spilled); the coreset keeps
        its float32 projection plus 12 bytes of search state per candidate patch, and ~200 MB of
        fixed work space (``coreset._BLOCK`` x ``_BATCH`` products, ``_PAIRS`` float64 rows).
        """
        p = self.params_
        ratio = getattr(p, "coreset_ratio", 1.0)
        picks = int(n_patches * ratio)
        needs = {"memory_bank": picks * dim * 4}
        if ratio < 1 and getattr(p, "coreset_method", "greedy") != "random":
            proj = min(getattr(p, "coreset_projection_dim", dim), dim)
            pts = n_patches if getattr(p, "coreset_method", "greedy") != "chunked" else min(n_patches, p.coreset_chunk_points)
            union = 2 * picks * proj * 4 if getattr(p, "coreset_method", "greedy") == "chunked" else 0
            needs["coreset_search"] = pts * (proj * 4 + 12) + union + (200 << 20)
        return needs

    def _check_memory(self, n_patches: int, dim: int) -> dict:
        """Log (and keep in ``timing_['estimate']``) the expected peak; stop if over ``max_memory_gb``."""
        needs = self._memory_needs(n_patches, dim)
        read = 2 * (1 << 14) * dim * 4  # a chunk of spilled rows being read, plus its projection
        base = _current_rss()
        peak = base + max(needs.values(), default=0) + read
        est = {"patches": n_patches, "dim": dim, "spill_bytes": n_patches * dim * 4,
               **{f"{k}_bytes": v for k, v in needs.items()}, "base_bytes": base, "expected_peak_bytes": peak,
               "expected_peak_gib": round(peak / 2**30, 3)}
        self.timing_["estimate"] = est
        log.info("fit estimate: %s patches x %s dims, memory bank %.2f GiB, expected peak %.2f GiB",
                 f"{n_patches:,}", dim, needs["memory_bank"] / 2**30, peak / 2**30)
        limit = self.params_.max_memory_gb
        if limit is not None and peak > limit * 2**30:
            raise ResourceError(
                f"the fit would need about {peak / 2**30:.1f} GiB ({n_patches:,} training patches x {dim} dims, "
                f"memory bank {needs['memory_bank'] / 2**30:.1f} GiB) but max_memory_gb is {limit:g}: lower "
                f"coreset_ratio, image_size, or tap a smaller (shallower) layer, or use fewer training images")
        return est

    def _report(self, stage: str, done: int, total: int | None) -> None:
        if self.fit_progress is not None:
            self.fit_progress(stage, done, total)

    def _coreset(self, features, n: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Greedy coreset of ``n`` rows of ``features`` (or of ``features[rows]``) with this detector's params."""
        p = self.params_
        total = int(min(max(n, 1), len(features) if rows is None else len(rows)))
        stage = f"coreset: {total:,} of {len(features) if rows is None else len(rows):,} patches"
        stats: dict = {}
        picks = greedy_coreset(features, n, p.coreset_projection_dim, p.seed,
                               method="chunked" if getattr(p, "coreset_method", "greedy") == "chunked" else "exact",
                               chunk_points=getattr(p, "coreset_chunk_points", 200_000), rows=rows,
                               progress=lambda i, t: self._report(stage, i, t), stats=stats)
        self.timing_.update(stats)
        return picks

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

    def _check_topk(self, grid_hw: tuple[int, int]) -> None:
        """Fail on the first batch (before the long work) when ``topk`` exceeds an image's patches."""
        k, n = self.params_.topk, int(grid_hw[0]) * int(grid_hw[1])
        if k is not None and k > n:
            raise ConfigError(f"detector.params.topk={k} is more than the {n} patches ({grid_hw[0]}x{grid_hw[1]}) of an image")

    def _check_index_fits(self, n_patches: int) -> None:
        """Fail before the memory bank is built when it cannot hold ``ivf_nlist`` lists (<= n_patches entries)."""
        p = self.params_
        if p.knn_index in ("ivf", "pca_ivf") and p.ivf_nlist is not None and p.ivf_nlist > n_patches:
            raise ConfigError(f"detector.params.ivf_nlist={p.ivf_nlist} is more than the {n_patches} training patches "
                              "the memory bank is drawn from")

    def _new_index(self) -> KNNIndex:
        p = self.params_
        return KNNIndex(self.metric, p.knn_backend, p.device, p.knn_index, hnsw_m=p.hnsw_m,
                        hnsw_ef_construction=p.hnsw_ef_construction, hnsw_ef_search=p.hnsw_ef_search,
                        ivf_nlist=p.ivf_nlist, ivf_nprobe=p.ivf_nprobe, pca_dim=p.pca_dim,
                        rerank_candidates=p.rerank_candidates, seed=p.seed)

    def _knn(self) -> KNNIndex:
        if getattr(self, "_index", None) is None:
            self._index = self._new_index().fit(self.memory_)
        return self._index

    def _predict(self, images: list) -> Prediction:
        p = self.params_
        if getattr(p, "tiling", None) is not None:
            return predict_tiled(self, images)
        scores, maps, boxes, hws, errors = [], [], [], [], {}
        timing = dict(load_s=0.0, embed_s=0.0, search_s=0.0, maps_s=0.0)
        for feats, batch in self._embed(images, timing, errors):
            B, h, w, D = feats.shape
            t0 = time.perf_counter()
            dists, idx = self._knn().search(feats.reshape(-1, D), k=self._k())
            dists = self._scale_distances(dists)
            patch = to_grid(self._score_patches(dists, idx), B, (h, w))
            t1 = time.perf_counter()
            batch_maps = self._maps(patch, batch)
            scores.append(self._image_scores(patch, dists, idx, feats, batch_maps))
            maps.extend(batch_maps)
            boxes.append(batch.boxes)
            hws.append(batch.orig_hw)
            timing["search_s"] += t1 - t0
            timing["maps_s"] += time.perf_counter() - t1
        same = len({m.shape for m in maps}) == 1
        scores = np.concatenate(scores).astype(np.float32)
        scores[list(errors)] = np.nan
        return Prediction(
            scores=scores,
            maps=np.stack(maps) if same else maps,
            boxes=np.concatenate(boxes),
            orig_hw=np.concatenate(hws),
            timing=timing,
            errors=errors,
        )

    def _k(self) -> int:
        return 1

    def _scale_distances(self, dists: np.ndarray) -> np.ndarray:
        # ``distance: squared`` (CNN detectors' parameter): the PatchCore and SoftPatch reference
        # code score with faiss IndexFlatL2, i.e. squared L2, and blur/upsample those values.
        if getattr(self.params_, "distance", "euclidean") == "squared":
            return np.square(dists)
        return dists

    def _maps(self, patch: np.ndarray, batch) -> list[np.ndarray]:
        """Anomaly maps of a batch: patch grids upsampled to the model input and blurred there."""
        return list(upsample(patch, tuple(batch.pixels.shape[-2:]), self.params_.blur_sigma))

    def _image_scores(self, patch: np.ndarray, dists, idx, feats, maps) -> np.ndarray:
        p = self.params_
        return aggregate(patch, p.aggregation, p.topk_ratio, p.topk, maps)

    # -- protocol --------------------------------------------------------------------------
    def protocol(self) -> dict:
        """The scoring choices in words, for the report's protocol (the params are saved with the model)."""
        p = self.params_
        out = {"image_score": describe_rule(p.aggregation, p.topk_ratio, p.topk, p.blur_sigma),
               "patch_features": self._describe_features()}
        rule = describe_input(self)  # image_size auto or tiling, as the fit resolved them
        if rule:
            out["input_rule"] = rule
        if getattr(p, "tiling", None) is not None:
            out["image_score"] += " of the stitched map (tiles' maps overlap-averaged; before the blur unless blurred_max)"
        return out

    def _describe_features(self) -> str:
        describe = getattr(self.params_, "describe_features", None)  # the CNN detectors' feature_aggregation
        if self.embedder is not None and not hasattr(self.embedder, "extractor"):
            return f"injected embedder {type(self.embedder).__name__}"
        return describe() if describe else f"{getattr(self.params_, 'backbone', '?')} patch tokens"

    # -- persistence ---------------------------------------------------------------------
    def state(self):
        self.check_fitted()
        arrays, extras = {"memory_": self.memory_}, {"n_train_patches_": self.n_train_patches_}
        save_inputs(self, arrays, extras)  # image_size auto's resolved size, per_tile banks' offsets
        if self.params_.knn_index != "exact":  # the faiss index's own bytes (no pickle), with a checksum
            arrays["knn_index_"], extras["knn_index_sha256"] = self._knn().to_array()
        return arrays, extras

    def load_state(self, arrays, extras) -> None:
        super().load_state(arrays, extras)
        self.memory_ = arrays["memory_"]
        self.n_train_patches_ = int(extras["n_train_patches_"])
        self._index = self._tile_index = None
        load_inputs(self, arrays, extras)
        if self.params_.knn_index != "exact":
            if "knn_index_" not in arrays or "knn_index_sha256" not in extras:
                raise ModelError(f"model has knn_index: {self.params_.knn_index} but no saved index (arrays.npz: knn_index_)")
            self._index = self._new_index().load_array(self.memory_, arrays["knn_index_"], extras["knn_index_sha256"])
