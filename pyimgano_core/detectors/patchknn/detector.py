"""The patch-kNN detector: embedder + input plan + memory bank (coreset) + kNN index + patch scorer + image score.

PatchCore, SoftPatch, AnomalyDINO and OpenCLIP patch kNN differ only in the parts they plug in:
the embedder (``_make_embedder``), the rows a training input contributes (``_references``:
AnomalyDINO's rotations and L2-normalised tokens), how memory rows are selected
(``_select_memory``: a coreset, or SoftPatch's noise filter then a coreset), the patch scorer
(``_make_scorer``: plain, or SoftPatch's matched weights) and the image-score rule
(``_image_scores``: an aggregation, or PatchCore's eq. 7). Each part is a small object of its
own module: :mod:`.plan`, :mod:`.bank`, :mod:`.coreset`, :mod:`.index`, :mod:`.scorer`,
:mod:`.image_score`, :mod:`.maps`.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch

from ...errors import ConfigError, DataError, ModelError
from ...optional import require
from ..base import Detector, Prediction
from . import bank
from .coreset import Coreset
from .image_score import aggregate, describe_rule
from .index import NNIndex, index_class, make_index
from .maps import to_grid, upsample
from .params import PatchKNNParams
from .plan import InputPlan
from .scorer import PlainScorer
from .tiling import Stitcher

FitProgress = Callable[[str, int, "int | None"], None]  # (stage, done, total)


class PatchEmbedder(Protocol):
    """Maps a batch of images (float [B, 3, h, w] in [0, 1], RGB) to patch features [B, h', w', D]."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


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

    Learned state: ``memory_`` [M, D], ``n_train_patches_``; ``tile_offsets_`` / ``tile_grid_``
    with ``tiling.bank: per_tile``; ``image_size_`` with ``image_size: auto``.
    """

    Params = PatchKNNParams
    metric: Literal["l2", "cosine"] = "l2"
    fit_progress: FitProgress | None = None  # set by the caller (the engine's progress bar); never prints

    def __init__(self, embedder: PatchEmbedder | None = None, **params):
        super().__init__(**params)
        self.embedder = embedder  # injectable (tests, custom models); built from params if None

    # -- parts a detector chooses ---------------------------------------------------------
    def _make_embedder(self) -> PatchEmbedder:  # pragma: no cover - abstract
        raise NotImplementedError

    def _patch_multiple(self) -> int | None:
        """Inputs are cropped to a multiple of this (a ViT's patch size); None: no constraint."""
        return None

    def _references(self, images: list) -> tuple[Sequence, Callable | None]:
        """The model inputs the memory is built from, and ``transform(feats, batch) -> rows`` (None: every row as is)."""
        return images, None

    def _select_memory(self, features, grid_hw: tuple[int, int] | None) -> np.ndarray:
        """Memory rows from the training features (a disk-backed store): the coreset's picks."""
        if self.coreset.params.ratio >= 1:
            return np.ascontiguousarray(features[:], dtype=np.float32)
        t0 = time.perf_counter()
        picks = self._coreset_picks(features)
        self.timing_["coreset_s"] = time.perf_counter() - t0
        return np.ascontiguousarray(features[picks], dtype=np.float32)

    def _make_scorer(self) -> PlainScorer:
        return PlainScorer(squared=self.params_.squared_distances())

    def _image_scores(self, patch: np.ndarray, dists, idx, feats, maps) -> np.ndarray:
        p = self.params_
        return aggregate(patch, p.aggregation, p.topk_ratio, p.topk, maps)

    def _maps(self, patch: np.ndarray, batch) -> list[np.ndarray]:
        """Anomaly maps of a batch: patch grids upsampled to the model input and blurred there."""
        return list(upsample(patch, tuple(batch.pixels.shape[-2:]), self.params_.blur_sigma))

    def _memory_needs(self, n_patches: int, dim: int) -> dict[str, int]:
        """Bytes of the fit's large arrays by stage (full training features are spilled, never all in memory)."""
        return self.coreset.memory_needs(n_patches, dim)

    # -- the parts, built from the parameters ---------------------------------------------
    @property
    def coreset(self) -> Coreset:
        return Coreset(self.params_.coreset, self.params_.seed)

    @property
    def plan(self) -> InputPlan:
        if getattr(self, "plan_", None) is None or self.plan_.params is not self.params_:
            self.plan_ = InputPlan(self.params_, self._patch_multiple)
        return self.plan_

    @property
    def geometry(self):
        return self.plan.geometry

    @property
    def image_size_(self) -> tuple[int, int] | None:
        """``image_size: auto``: the (h, w) the fit resolved."""
        return self.plan.size_

    @property
    def scorer(self) -> PlainScorer:
        if getattr(self, "scorer_", None) is None:
            self.scorer_ = self._make_scorer()
        return self.scorer_

    def _embedder(self) -> PatchEmbedder:
        if self.embedder is None:
            self.embedder = self._make_embedder()
        return self.embedder

    def _k(self) -> int:
        return self.scorer.k

    def _new_index(self) -> NNIndex:
        p = self.params_
        return make_index(p.knn, self.metric, p.device, p.seed)

    def _knn(self) -> NNIndex:
        if getattr(self, "_index", None) is None:
            self._index = self._new_index().fit(self.memory_)
        return self._index

    def _tile_knn(self, pos: int | None) -> NNIndex:
        """The index of tile position ``pos``'s bank (``tiling.bank: per_tile``), or the one index (None)."""
        if pos is None:
            return self._knn()
        if getattr(self, "_tile_index", None) is None:
            self._tile_index = {}
        if pos not in self._tile_index:
            a, b = self.tile_offsets_[pos], self.tile_offsets_[pos + 1]
            self._tile_index[pos] = self._new_index().fit(self.memory_[a:b])
        return self._tile_index[pos]

    def _coreset_picks(self, features, rows: np.ndarray | None = None, n_total: int | None = None) -> np.ndarray:
        """Sorted positions (in ``features``, or in ``rows``) of the rows this detector's coreset keeps."""
        cs = self.coreset
        n_rows = len(features) if rows is None else len(rows)
        label = f"coreset: {min(cs.size(n_rows if n_total is None else n_total), n_rows):,} of {n_rows:,} patches"
        stats: dict = {}
        picks = cs.run(features, n_total=n_total, rows=rows, progress=lambda i, t: self._report(label, i, t), stats=stats)
        self.timing_.update(stats)
        return picks

    # -- fit ------------------------------------------------------------------------------
    def fit(self, images) -> "PatchKNNDetector":
        params = self.Params.model_validate(self.params)
        if index_class(params.knn.kind).needs_faiss:
            require("faiss", extra="faiss")  # before the long work
        super().fit(images)
        self._index = None
        if params.knn.kind != "exact":  # built now: its cost is fit time, bad sizes fail here
            t0 = time.perf_counter()
            self._knn()
            self.timing_["index_s"] = time.perf_counter() - t0
        return self

    def _fit(self, images: list) -> None:
        self.scorer_ = self._tile_index = self.tile_offsets_ = self.tile_grid_ = None
        n_inputs, grids = self.plan.resolve(images, self._embedder())  # before the long work
        refs, transform = self._references(images)
        copies = len(refs) // max(1, len(images))  # augmented copies keep each image's size (and tile grid)
        n_inputs, grids = n_inputs * copies, grids and [g for g in grids for _ in range(copies)]
        batches = self._embed(refs, self.timing_)
        if grids and self.params_.tiling.bank == "per_tile":
            n_pos = grids[0].shape[0] * grids[0].shape[1]
            self.memory_, self.tile_offsets_, self.n_train_patches_ = bank.build_per_tile(
                batches, n_inputs, n_pos, self._select_memory, self._check_memory, self.params_.spill_dir, self.timing_,
                transform, self._report)
            self.tile_grid_ = tuple(grids[0].shape)
        else:
            def select(store, grid_hw):
                index_class(self.params_.knn.kind).check_capacity(self.params_.knn, len(store))
                return self._select_memory(store, grid_hw)

            self.memory_, self.n_train_patches_ = bank.build_shared(
                batches, n_inputs, select, self._check_memory, self._check_topk, self.params_.spill_dir, self.timing_,
                transform, self._report)
        self._index = self._tile_index = None

    def _check_memory(self, n_patches: int, dim: int) -> dict:
        """Keep the expected peak in ``timing_['estimate']``; stop if over ``max_memory_gb``."""
        est = bank.estimate(self._memory_needs(n_patches, dim), n_patches, dim, self.params_.max_memory_gb)
        self.timing_["estimate"] = est
        return est

    def _check_topk(self, grid_hw: tuple[int, int]) -> None:
        """Fail on the first batch (before the long work) when ``topk`` exceeds an image's patches."""
        k, n = self.params_.topk, int(grid_hw[0]) * int(grid_hw[1])
        if k is not None and k > n:
            raise ConfigError(f"detector.params.topk={k} is more than the {n} patches ({grid_hw[0]}x{grid_hw[1]}) of an image")

    def _report(self, stage: str, done: int, total: int | None) -> None:
        if self.fit_progress is not None:
            self.fit_progress(stage, done, total)

    # -- embedding ------------------------------------------------------------------------
    def _embed(self, images: list, timing: dict, errors: dict | None = None):
        """Yield (features [B, h', w', D] float32 numpy, batch); adds load/embed seconds to ``timing``.

        ``errors`` (predict): images that cannot be scored are recorded there (index -> reason) instead
        of raising; untiled, such an image is still in its batch (its rows are ignored by the caller)."""
        emb = self._embedder()
        p = self.params_
        batches = self.plan.batches(images, p.batch_size, errors, getattr(self, "tile_grid_", None))
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
            if p.tiling is None:
                _check_grid(images, start, batch.orig_hw, feats.shape[1:3], errors)
            start += len(feats)
            yield feats, batch

    # -- predict --------------------------------------------------------------------------
    def _patch_scores(self, feats: np.ndarray, pos: int | None = None) -> np.ndarray:
        """Patch scores [B, h, w] of features [B, h, w, D] (with the index of tile position ``pos``), plus the search."""
        B, h, w, D = feats.shape
        dists, idx = self._tile_knn(pos).search(feats.reshape(-1, D), k=self._k())
        return to_grid(self.scorer(dists, idx), B, (h, w)), dists, idx

    def _predict(self, images: list) -> Prediction:
        if self.params_.tiling is not None:
            return self._predict_tiled(images)
        scores, maps, boxes, hws, errors = [], [], [], [], {}
        timing = dict(load_s=0.0, embed_s=0.0, search_s=0.0, maps_s=0.0)
        for feats, batch in self._embed(images, timing, errors):
            t0 = time.perf_counter()
            patch, dists, idx = self._patch_scores(feats)
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
        return Prediction(scores=scores, maps=np.stack(maps) if same else maps, boxes=np.concatenate(boxes),
                          orig_hw=np.concatenate(hws), timing=timing, errors=errors)

    def _predict_tiled(self, images: list) -> Prediction:
        """Score every tile against its bank, stitch the tiles of each image, score the stitched map.

        Maps: each tile's patch grid is upsampled to the tile, tiles are overlap-averaged, and only
        then blurred (seams are not blurred twice); the image score is the aggregation over the
        stitched map before the blur (blurred_max: after it).
        """
        p = self.params_
        per_tile = p.tiling.bank == "per_tile"
        timing = dict(load_s=0.0, embed_s=0.0, search_s=0.0, maps_s=0.0)
        open_: dict[int, Stitcher] = {}
        scores, maps, hws = np.zeros(len(images), np.float32), [None] * len(images), np.zeros((len(images), 2), np.int64)
        errors: dict[int, str] = {}
        for feats, batch in self._embed(images, timing, errors):
            B, h, w, _ = feats.shape
            t0 = time.perf_counter()
            patch = np.empty((B, h, w), np.float32)
            for k in (np.unique(batch.pos) if per_tile else [None]):
                sel = np.ones(B, bool) if k is None else batch.pos == k
                patch[sel] = self._patch_scores(feats[sel], None if k is None else int(k))[0]
            t1 = time.perf_counter()
            for o, grid in batch.grids.items():
                open_[o] = Stitcher(grid)
            for j in range(B):
                o = int(batch.owner[j])
                st = open_[o]
                st.add(int(batch.pos[j]), patch[j])
                if st.complete:
                    stitched = open_.pop(o).result()
                    maps[o] = upsample(stitched[None], stitched.shape, p.blur_sigma)[0]
                    scores[o] = aggregate(stitched[None], p.aggregation, p.topk_ratio, p.topk, maps[o][None])[0]
                    hws[o] = st.grid.orig_hw
            timing["search_s"] += t1 - t0
            timing["maps_s"] += time.perf_counter() - t1
        for o in errors:  # no tiles: a NaN score and a 1x1 placeholder map (Prediction.errors says why)
            scores[o], maps[o] = np.nan, np.full((1, 1), np.nan, np.float32)
        boxes = np.array([[0.0, 0.0, float(h), float(w)] for h, w in hws])
        same = len({m.shape for m in maps}) == 1
        return Prediction(scores=scores, maps=np.stack(maps) if same else maps, boxes=boxes, orig_hw=hws, timing=timing,
                          errors=errors)

    # -- protocol --------------------------------------------------------------------------
    def protocol(self) -> dict:
        """The scoring choices in words, for the report's protocol (the params are saved with the model)."""
        p = self.params_
        out = {"image_score": describe_rule(p.aggregation, p.topk_ratio, p.topk, p.blur_sigma),
               "patch_features": self._describe_features()}
        rule = self.plan.describe(self.tile_grid_)  # image_size auto or tiling, as the fit resolved them
        if rule:
            out["input_rule"] = rule
        if p.tiling is not None:
            out["image_score"] += " of the stitched map (tiles' maps overlap-averaged; before the blur unless blurred_max)"
        return out

    def _describe_features(self) -> str:
        if self.embedder is not None and not hasattr(self.embedder, "extractor"):
            return f"injected embedder {type(self.embedder).__name__}"
        return self.params_.describe_features()

    # -- persistence ---------------------------------------------------------------------
    def state(self):
        self.check_fitted()
        arrays, extras = {"memory_": self.memory_}, {"n_train_patches_": self.n_train_patches_}
        self.plan.save(extras)  # image_size auto's resolved size
        if self.tile_offsets_ is not None:
            arrays["tile_offsets_"], extras["tile_grid_"] = self.tile_offsets_, list(self.tile_grid_)
        if self.params_.knn.kind != "exact":  # the faiss index's own bytes (no pickle), with a checksum
            more_arrays, more_extras = self._knn().save()
            arrays.update(more_arrays)
            extras.update(more_extras)
        return arrays, extras

    def load_state(self, arrays, extras) -> None:
        super().load_state(arrays, extras)
        self.memory_ = arrays["memory_"]
        self.n_train_patches_ = int(extras["n_train_patches_"])
        self._index = self._tile_index = self.scorer_ = self.tile_offsets_ = self.tile_grid_ = None
        self.plan.load(extras)
        if self.params_.tiling is not None and self.params_.tiling.bank == "per_tile":
            self.tile_offsets_, self.tile_grid_ = _per_tile_state(arrays, extras, len(self.memory_))
        if self.params_.knn.kind != "exact":
            self._index = self._new_index().load(self.memory_, arrays, extras)


def _per_tile_state(arrays: dict, extras: dict, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Saved per-tile bank offsets and grid, checked against the memory's ``n`` entries."""
    off, grid = arrays.get("tile_offsets_"), extras.get("tile_grid_")
    if (off is None or not isinstance(grid, list) or len(grid) != 2 or off.ndim != 1 or len(off) != grid[0] * grid[1] + 1
            or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 1)):
        raise ModelError("model has tiling.bank: per_tile but its tile_offsets_ / tile_grid_ do not describe "
                         f"{n} memory entries in one bank per tile position")
    return off.astype(np.int64), (int(grid[0]), int(grid[1]))
