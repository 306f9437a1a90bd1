"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with
DINOv2", WACV 2025; https://arxiv.org/abs/2405.14529).

Patch kNN on foundation-model patch tokens, as in the authors' reference code: the smaller image
edge is resized to 448 and the input cropped to a multiple of the patch size (14); the memory
bank holds the L2-normalised patch tokens of the reference (few-shot) images; a test patch
scores its cosine distance to the nearest reference patch (k=1); the image score is the mean
of the top 1% patch scores; the map is the patch grid upsampled bilinearly and blurred with a
Gaussian of sigma 4. Options from the paper: zero-shot foreground masking (first PCA component
of the image's own patch tokens, thresholded), rotation augmentation of the reference images.
Added here: memory-bank subsampling (greedy coreset or random, seeded). Few-shot is set by
``dataset.shots`` in the experiment config.

Example
-------
>>> det = AnomalyDINO(weights=None).fit(train_paths[:1])   # DINOv2 ViT-S/14 (random weights)
>>> pred = det.predict(test_paths)   # pred.scores [N], pred.maps [N, 448, 448] for square images
"""
from __future__ import annotations

import time
from typing import Literal, Sequence

import cv2
import numpy as np
from pydantic import Field, model_validator

from ..features.geometry import Geometry
from ..features.vit import build_embedder, parse_backbone
from .base import register_detector
from ..features.store import FeatureStore
from .patchknn import PatchKNNDetector, PatchKNNParams

ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)  # the reference code's augmentation


class FoundationPatchParams(PatchKNNParams):
    """Patch kNN on a foundation model's patch tokens (AnomalyDINO defaults)."""

    backbone: str = Field("dinov2_vits14", description="dinov2_vit{s,b,l,g}14[_reg] | timm:<name> | openclip:<model> | torchvision:<name>")
    weights: str | None = Field("DEFAULT", description="DEFAULT (pretrained), a local checkpoint path, an OpenCLIP tag, or null (random)")
    layers: list[str] | None = Field(None, description="tapped layers, shallowest first (torchvision backbones only)")
    image_size: int | tuple[int, int] = 448
    resize_mode: Literal["squash", "shorter_side"] = "shorter_side"
    patch_multiple: int | None = Field(None, ge=1, description="crop the input to a multiple of this (None: the embedder's patch size)")
    aggregation: Literal["max", "mean", "topk_mean"] = "topk_mean"
    masking: bool = Field(False, description="zero-shot foreground masking of test patches (PCA of patch tokens)")
    mask_reference: bool = Field(False, description="also drop background patches of reference images (needs masking)")
    mask_threshold: float = Field(10.0, description="first-PCA-component threshold (DINOv2 ViT-S/14 feature units)")
    rotation: bool = Field(False, description=f"augment reference images by rotations {ROTATION_ANGLES}")
    coreset_ratio: float = Field(1.0, gt=0, le=1, description="share of reference patches kept in memory (1 = all, as the paper)")
    coreset_method: Literal["greedy", "chunked", "random"] = Field(
        "greedy", description="greedy: exact greedy k-center; chunked: exact greedy per chunk of coreset_chunk_points "
        "patches, union of the chunks (approximate, linear cost); random: a seeded random subset")
    coreset_projection_dim: int = Field(128, ge=1, description="random projection used by the greedy coreset")
    coreset_chunk_points: int = Field(200_000, ge=1000, description="patches per chunk of the chunked coreset")

    @model_validator(mode="after")
    def _consistent(self):
        family, _ = parse_backbone(self.backbone)  # ValueError -> a config error naming the field
        if (family == "torchvision") != bool(self.layers):
            raise ValueError("layers must be given for torchvision:<name> backbones, and only for them")
        if self.mask_reference and not self.masking:
            raise ValueError("mask_reference needs masking: true")
        return self


def foreground_mask(tokens: np.ndarray, threshold: float = 10.0, border: float = 0.2) -> np.ndarray:
    """Zero-shot foreground of one image from its patch tokens ``[h, w, D]`` -> bool ``[h, w]``.

    As AnomalyDINO's reference code: project the tokens on their first principal component and
    keep patches above ``threshold``; if that keeps at most 35% of the central region (``border``
    cut from each side) the sign is flipped (objects are assumed centred); then a 3x3 dilation and
    a 3x3 closing fill small holes and enlarge the mask slightly.
    """
    h, w, D = tokens.shape
    x = tokens.reshape(-1, D).astype(np.float64)
    x -= x.mean(0)
    v = np.linalg.svd(x, full_matrices=False)[2][0]
    v = v if v[np.argmax(np.abs(v))] >= 0 else -v  # sklearn's sign convention for components
    pc = (x @ v).reshape(h, w)
    mask = pc > threshold
    centre = mask[int(h * border) : int(h * (1 - border)), int(w * border) : int(w * (1 - border))]
    if centre.sum() <= 0.35 * centre.size:
        mask = -pc > threshold
    kernel = np.ones((3, 3), np.uint8)
    mask = cv2.dilate(mask.astype(np.uint8), kernel)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel).astype(bool)


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the image centre, same size, reflected border (the reference augmentation)."""
    h, w = image.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(image, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


class RotatedImages(Sequence):
    """Each image under every angle, decoded and rotated lazily (8x the images would not fit in memory)."""

    def __init__(self, images: list, angles: Sequence[float] = ROTATION_ANGLES):
        self.images, self.angles = images, tuple(angles)

    def __len__(self) -> int:
        return len(self.images) * len(self.angles)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from ..data.io import read_image

        item = self.images[i // len(self.angles)]
        image = read_image(item) if not isinstance(item, np.ndarray) else item
        return rotate(image, self.angles[i % len(self.angles)])


class FoundationPatchKNN(PatchKNNDetector):
    """Memory of L2-normalised patch tokens; cosine distance to the nearest one; top-1% mean."""

    Params = FoundationPatchParams
    metric = "cosine"

    @property
    def geometry(self) -> Geometry:
        p = self.params_
        multiple = p.patch_multiple or getattr(self._embedder(), "patch_size", None)
        return Geometry(size=p.image_size, crop=p.crop, mode=p.resize_mode, multiple=multiple)

    def _make_embedder(self):
        p = self.params_
        return build_embedder(p.backbone, p.weights, p.layers, p.device)

    def _embed(self, images: list, timing: dict):
        # The foreground of each batch is kept for _score_patches and _fit, which see the batch next.
        for feats, batch in super()._embed(images, timing):
            p = self.params_
            self._batch_fg = np.stack([foreground_mask(f, p.mask_threshold) for f in feats]) if p.masking else None
            yield feats, batch

    def _fit(self, images: list) -> None:
        p = self.params_
        refs = RotatedImages(images) if p.rotation else images

        def rows(feats, batch):  # (B*h*w, D) L2-normalised; grids may differ between images
            flat = feats.reshape(-1, feats.shape[-1])
            flat = flat[self._batch_fg.ravel()] if p.mask_reference else flat
            return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)

        with FeatureStore(p.spill_dir) as store:
            self._spill(refs, store, transform=rows)
            t0 = time.perf_counter()
            self._build_memory(store, None)
            self.timing_["memory_s"] = time.perf_counter() - t0
            self.n_train_patches_ = int(len(store))
            self.timing_["spill"] = store.describe()
        self.timing_["spill"]["removed"] = store.removed
        self._index = None

    def _build_memory(self, features, grid_hw) -> None:
        """Memory of the (already L2-normalised) reference patches, optionally subsampled."""
        p = self.params_
        if p.coreset_ratio < 1:
            n = max(1, int(len(features) * p.coreset_ratio))
            if p.coreset_method == "random":
                keep = np.random.default_rng(p.seed).choice(len(features), size=n, replace=False)
            else:
                keep = self._coreset(features, n)
            self.memory_ = np.ascontiguousarray(features[np.sort(keep)], dtype=np.float32)
        else:
            self.memory_ = np.ascontiguousarray(features[:], dtype=np.float32)

    def _score_patches(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        scores = dists[:, 0]
        # Background patches score 0, as in the reference code (they still count in the top-1% mean).
        return scores if self._batch_fg is None else np.where(self._batch_fg.ravel(), scores, 0.0).astype(np.float32)


@register_detector
class AnomalyDINO(FoundationPatchKNN):
    name = "anomalydino"
