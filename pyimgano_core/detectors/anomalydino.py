"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with
DINOv2", WACV 2025; https://arxiv.org/abs/2405.14529).

Patch kNN on foundation-model patch tokens, as in the authors' reference code: the smaller image
edge is resized to 448 and the input cropped to a multiple of the patch size (14); the memory
bank holds the L2-normalised patch tokens of the reference (few-shot) images; a test patch
scores its cosine distance to the nearest reference patch (k=1); the image score is the mean
of the top 1% patch scores; the map is the patch grid upsampled bilinearly to the original
image size and blurred there with a Gaussian of sigma 4 (the reference's ``dists2map``;
``blur_at: input`` blurs at the model input instead). Options from the paper: zero-shot
foreground masking (first PCA component of the image's own patch tokens, thresholded;
``masking: reference`` applies the reference's per-category table), rotation augmentation of
the reference images.
Added here: memory-bank subsampling (greedy coreset or random, seeded), and tiles for
high-resolution parts (``tiling``, through the shared patch-kNN core, :mod:`.tiling`: each tile,
a multiple of the patch size, is one model input; its tokens are L2-normalised into the bank;
masking is refused with tiles). Few-shot is set by ``dataset.shots`` in the experiment config.

Example
-------
>>> det = AnomalyDINO(weights=None).fit(train_paths[:1])   # DINOv2 ViT-S/14 (random weights)
>>> pred = det.predict(test_paths)   # pred.scores [N], pred.maps [N, 448, 448] for square images
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from ..features.vit import build_embedder, parse_backbone
from .base import register_detector
from ..errors import ConfigError
from .patchknn import Aggregation, PatchKNNDetector, PatchKNNParams, upsample
from .patchknn.coreset import CoresetParams, ExactCoreset
from .patchknn.rotations import ANOMALYDINO_ANGLES as ROTATION_ANGLES, RotatedImages
from .patchknn.scorer import PlainScorer


# The reference's masking per category (src/utils.py get_dataset_info, preprocess "agnostic" /
# "informed", chosen by the paper's masking test, Fig. 2): MVTec AD masks capsule, hazelnut,
# pill, screw and toothbrush; VisA masks every category.
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                   "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
REFERENCE_MASKING = {c: c in ("capsule", "hazelnut", "pill", "screw", "toothbrush") for c in MVTEC_CATEGORIES} | {
    c: True for c in VISA_CATEGORIES}
DINOV2_MASK_THRESHOLD = 10.0  # the reference's threshold on the first PCA component (DINOv2 units)


class FoundationPatchParams(PatchKNNParams):
    """Patch kNN on a foundation model's patch tokens (AnomalyDINO defaults)."""

    backbone: str = Field("dinov2_vits14", description="dinov2_vit{s,b,l,g}14[_reg] | timm:<name> | openclip:<model> | torchvision:<name>")
    weights: str | None = Field("DEFAULT", description="DEFAULT (pretrained), a local checkpoint path, an OpenCLIP tag, or null (random)")
    layers: list[str] | None = Field(None, description="tapped layers, shallowest first (torchvision backbones only)")
    image_size: int | tuple[int, int] | None = Field(448, description="resize target (shorter_side: short edge; squash: "
                                                     "exact h,w); null with tiling")
    resize_mode: Literal["squash", "shorter_side"] = "shorter_side"
    patch_multiple: int | None = Field(None, ge=1, description="crop the input to a multiple of this (None: the embedder's patch size)")
    aggregation: Aggregation = "topk_mean"
    masking: bool | Literal["reference"] = Field(
        False, description="zero-shot foreground masking of test patches (PCA of patch tokens); "
        "reference: on or off per category as the reference code (MVTec: capsule, hazelnut, pill, screw, toothbrush; VisA: all)")
    mask_reference: bool = Field(False, description="also drop background patches of reference images (needs masking)")
    mask_threshold: float | None = Field(
        None, description="first-PCA-component threshold; None: 10 for DINOv2 backbones (the reference's, in its feature "
        "units), required for any other backbone when masking")
    mask_morphology: Literal["raster", "grid"] = Field(
        "raster", description="hole filling of the mask: raster = the reference's 3x3 dilation + closing, which runs on the "
        "flattened (N, 1) column, i.e. 1-D along raster order; grid = the same 3x3 operations on the 2-D patch grid")
    blur_at: Literal["original", "input"] = Field(
        "original", description="where the sigma is applied: original = upsample to the original image, then blur there "
        "(the reference's dists2map); input = blur at the model input, then resize")
    category: str | None = Field(None, description="dataset category, set by the engine; selects the masking: reference entry")
    rotation: bool = Field(False, description=f"augment reference images by rotations {ROTATION_ANGLES}")
    coreset: CoresetParams = Field(default_factory=lambda: ExactCoreset(ratio=1.0),
                                   description="memory bank subsampling (ratio 1 = every reference patch, as the paper); "
                                   "method exact (greedy k-center) | chunked | random")

    @model_validator(mode="after")
    def _consistent(self):
        family, _ = parse_backbone(self.backbone)  # ValueError -> a config error naming the field
        if (family == "torchvision") != bool(self.layers):
            raise ValueError("layers must be given for torchvision:<name> backbones, and only for them")
        if self.mask_reference and self.masking is False:
            raise ValueError("mask_reference needs masking: true (or reference)")
        if self.tiling is not None:
            self._tiling_applies()
        if self.masking is not False and self.mask_threshold is None and "dinov2" not in self.backbone:
            raise ValueError(f"masking needs an explicit mask_threshold for {self.backbone}: the default 10 is in "
                             "DINOv2 feature units (the first PCA component's scale differs between towers)")
        return self

    def _tiling_applies(self) -> None:
        # Tiles go through the shared patch-kNN core (tiling.py); what it cannot reproduce is refused.
        if self.masking is not False:
            raise ValueError("masking does not apply with tiling: the zero-shot mask assumes one centred object per "
                             "model input (PCA of one input's tokens), a tile shows part of it; use masking: false")
        if self.patch_multiple is not None:
            raise ValueError("patch_multiple does not apply with tiling: tiling.tile must itself be a multiple of the "
                             "patch size (checked at fit)")
        if self.blur_at == "original" and self.tiling.scale != 1:
            raise ValueError("blur_at: original does not apply with tiling.scale != 1: the stitched map is blurred at the "
                             "scaled image (tile pixels); use blur_at: input")

    def masking_on(self) -> bool:
        """Whether test patches are masked: ``masking`` itself, or the reference's table entry."""
        if self.masking != "reference":
            return bool(self.masking)
        if self.category not in REFERENCE_MASKING:
            raise ConfigError(f"detector.params.masking=reference knows the MVTec AD and VisA categories; "
                              f"got category {self.category!r}: set masking to true or false")
        return REFERENCE_MASKING[self.category]

    def threshold(self) -> float:
        return DINOV2_MASK_THRESHOLD if self.mask_threshold is None else self.mask_threshold

    def describe_features(self) -> str:
        """One line for the report's protocol."""
        return f"{self.backbone} patch tokens"


def foreground_mask(tokens: np.ndarray, threshold: float = DINOV2_MASK_THRESHOLD, border: float = 0.2,
                    morphology: Literal["raster", "grid"] = "raster") -> np.ndarray:
    """Zero-shot foreground of one image from its patch tokens ``[h, w, D]`` -> bool ``[h, w]``.

    As AnomalyDINO's reference code (``compute_background_mask``): project the tokens on their
    first principal component and keep patches above ``threshold``; if that keeps at most 35% of
    the central region (``border`` cut from each side) the sign is flipped (objects are assumed
    centred); then a 3x3 dilation and a 3x3 closing "fill small holes and enlarge slightly".

    ``morphology="raster"`` is what the reference computes: it applies the 3x3 operations to the
    PCA output's (h*w, 1) column, so they act along raster order only (a patch's neighbours are
    the previous and next patch, wrapping across row ends). ``"grid"`` applies them to the 2-D
    patch grid, which is what the reference's comment describes; it grows the mask vertically as
    well (more area). The default is the reference's, which produced the published numbers.
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
    m = mask.astype(np.uint8).reshape(-1, 1) if morphology == "raster" else mask.astype(np.uint8)
    m = cv2.morphologyEx(cv2.dilate(m, kernel), cv2.MORPH_CLOSE, kernel)
    return m.reshape(h, w).astype(bool)


class FoundationPatchKNN(PatchKNNDetector):
    """Memory of L2-normalised patch tokens; cosine distance to the nearest one; top-1% mean."""

    Params = FoundationPatchParams
    metric = "cosine"

    def _patch_multiple(self) -> int | None:
        return self.params_.patch_multiple or getattr(self._embedder(), "patch_size", None)

    def _make_embedder(self):
        p = self.params_
        return build_embedder(p.backbone, p.weights, p.layers, p.device)

    def _embed(self, images: list, timing: dict, errors: dict | None = None):
        # The foreground of each batch is kept for _score_patches and _fit, which see the batch next.
        for feats, batch in super()._embed(images, timing, errors):
            p = self.params_
            self._batch_fg = (np.stack([foreground_mask(f, p.threshold(), morphology=p.mask_morphology) for f in feats])
                              if p.masking_on() else None)
            yield feats, batch

    def _fit(self, images: list) -> None:
        p = self.params_
        patch = getattr(self._embedder(), "patch_size", None)
        if p.tiling is not None and patch and p.tiling.tile % patch:  # before any feature is extracted
            raise ConfigError(f"detector.params.tiling.tile={p.tiling.tile} is not a multiple of the backbone's patch size "
                              f"{patch} (a tile is one model input): use e.g. {max(patch, p.tiling.tile // patch * patch)}")
        super()._fit(images)  # PatchKNNDetector: input plan (tiles) -> _references -> spill -> memory

    def _references(self, images: list):
        p = self.params_

        def rows(feats, batch):  # (B*h*w, D) L2-normalised; grids may differ between images
            flat = feats.reshape(-1, feats.shape[-1])
            flat = flat[self._batch_fg.ravel()] if p.mask_reference and self._batch_fg is not None else flat
            return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)

        return (RotatedImages(images, ROTATION_ANGLES) if p.rotation else images), rows

    def _maps(self, patch: np.ndarray, batch) -> list[np.ndarray]:
        if self.params_.blur_at == "input":
            return super()._maps(patch, batch)
        # The reference's dists2map: cv2.resize of the distance grid to the original image size,
        # then scipy gaussian_filter(sigma=4) there. Here the size is that of the box of the
        # original image the input shows (the whole image unless cropped to the patch multiple);
        # the engine then has nothing left to resize.
        out = []
        for grid, box, hw in zip(patch, batch.boxes, batch.orig_hw):
            y0, x0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
            y1, x1 = min(int(hw[0]), int(round(box[2]))), min(int(hw[1]), int(round(box[3])))
            out.append(upsample(grid[None], (y1 - y0, x1 - x0), self.params_.blur_sigma)[0])
        return out

    def _make_scorer(self) -> PlainScorer:
        return ForegroundScorer(lambda: self._batch_fg)


class ForegroundScorer(PlainScorer):
    """Cosine distance to the nearest reference patch; background patches of the batch score 0.

    As the reference code, masked-out patches still count in the top-1% mean (with score 0).
    ``foreground()`` gives the current batch's mask [B, h, w] (None: masking off).
    """

    def __init__(self, foreground):
        super().__init__(squared=False)
        self.foreground = foreground

    def __call__(self, dists: np.ndarray, idx: np.ndarray) -> np.ndarray:
        scores, fg = dists[:, 0], self.foreground()
        return scores if fg is None else np.where(fg.ravel(), scores, 0.0).astype(np.float32)


@register_detector
class AnomalyDINO(FoundationPatchKNN):
    name = "anomalydino"
