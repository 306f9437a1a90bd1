"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Paper: https://arxiv.org/abs/2106.08265 . Memory bank of locally aware patch features from
two mid-level layers, subsampled by greedy k-center coreset; a test patch scores its squared L2
distance to the nearest memory entry (the reference code's faiss ``IndexFlatL2``; ``distance:
euclidean`` for the square root); the image score is the maximum patch score; the map is the
patch grid upsampled bilinearly to the model input and blurred there with a Gaussian of sigma 4.

Example
-------
>>> det = PatchCore(backbone="mobilenet_v2", layers=["features.6", "features.13"],
...                 weights="../shared/weights/mobilenet_v2-b0353104.pth").fit(train_paths)
>>> pred = det.predict(test_paths)   # pred.scores [N], pred.maps [N, 256, 256]
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ..features.backbones import FeatureExtractor
from ..features.patch_embed import ConcatPatchEmbedder, LocalPatchEmbedder
from .base import MAX_SIDE, register_detector
from .patchknn import PatchKNNDetector, PatchKNNParams
from .patchknn.rotations import RotatedImages


class CNNPatchParams(PatchKNNParams):
    """Backbone and locally aware patch features (shared by PatchCore and SoftPatch).

    Defaults are the paper's (Sec. 4.1) and the reference code's (amazon-science/patchcore-inspection):
    shorter side resized to 256 then centre crop 224 (``transforms.Resize(256)`` +
    ``CenterCrop(224)`` in its ``datasets/mvtec.py``; identical to a 256x256 squash on square
    MVTec images, different on VisA/BTAD), WideResNet50 with the ImageNet weights that
    ``pretrained=True`` loads (torchvision's ``IMAGENET1K_V1``; ``DEFAULT`` would be V2), and
    squared L2 patch distances (the reference's faiss ``IndexFlatL2``).
    """

    image_size: int | tuple[int, int] | Literal["auto"] | None = Field(
        256, description="resize target (squash: exact h,w; shorter_side: short edge); auto: (h, w) from the training "
        "images' median aspect ratio and pixel_budget; null with tiling")
    crop: int | tuple[int, int] | None = Field(224, description="centre crop after resize (None = whole image)")
    resize_mode: Literal["squash", "shorter_side"] = "shorter_side"

    backbone: str = Field("wide_resnet50_2", description="torchvision model name")
    layers: list[str] = Field(["layer2", "layer3"], min_length=1, description="tapped layers, shallowest first")
    weights: str | None = Field(
        "IMAGENET1K_V1", description="torchvision weights name (DEFAULT = torchvision's newest), local checkpoint path, or null (random)")
    distance: Literal["euclidean", "squared"] = Field(
        "squared", description="patch score scale: squared L2 (the reference's faiss IndexFlatL2) or Euclidean; "
        "image AUROC is the same, maps and SoftPatch's weighted scores differ")
    patch_size: int = Field(
        3, ge=1, description="local neighbourhood aggregated around each position (even sizes as the reference: "
        "padding (k-1)//2, so the grid shrinks by one)")
    feature_aggregation: Literal["reference", "concat"] = Field(
        "reference", description="how the tapped layers become one patch feature: reference = the PatchCore code's "
        "per-layer unfold + adaptive pooling to pretrain_embed_dim, then to target_embed_dim (each layer an equal share); "
        "concat = anomalib's 3x3 mean of each tap, native channels concatenated (optional layer_weights)")
    pretrain_embed_dim: int = Field(1024, ge=1, description="reference: per-layer dimension after adaptive average pooling")
    target_embed_dim: int = Field(1024, ge=1, description="reference: final patch feature dimension")
    layer_weights: list[float] | None = Field(
        None, description="concat: one positive factor per tapped layer, multiplying its channels (None: all 1)")
    # -- how images become model inputs: image_size auto, or tiles (patchknn/plan.py, patchknn/tiling.py)
    pixel_budget: int = Field(224 * 224, ge=1, le=MAX_SIDE * MAX_SIDE,
                              description="image_size auto: model-input pixels h*w (each side a multiple of the largest stride)")
    # (tiling, the other input rule, is a PatchKNNParams field: patchknn/params.py)

    @model_validator(mode="before")
    @classmethod
    def _input_defaults(cls, data):
        # auto is a fixed-size input without a crop: unset resize_mode/crop default to that
        if isinstance(data, dict) and data.get("image_size") == "auto":
            data = {"resize_mode": "squash", "crop": None, **data}
        return data

    @model_validator(mode="after")
    def _input_rules(self):
        if self.image_size == "auto" and (self.crop is not None or self.resize_mode != "squash"):
            raise ValueError("image_size: auto is a fixed (h, w) input: use crop: null and resize_mode: squash")
        if self.image_size != "auto" and self.pixel_budget != type(self).model_fields["pixel_budget"].default:
            raise ValueError("pixel_budget only applies with image_size: auto")
        return self

    @field_validator("layer_weights")
    @classmethod
    def _one_weight_per_layer(cls, v, info):
        if v is None:
            return v
        layers = info.data.get("layers")
        if layers is not None and len(v) != len(layers):
            raise ValueError(f"{len(v)} weights for {len(layers)} layers {layers}: give one weight per tapped layer")
        if any(not w > 0 for w in v):
            raise ValueError(f"weights must be positive (a zero weight drops its layer: remove it from layers); got {v}")
        return v

    @model_validator(mode="after")
    def _aggregation_options_apply(self):
        # No dead options: each feature_aggregation has its own knobs.
        fields = type(self).model_fields
        if self.feature_aggregation == "concat":
            for name in ("pretrain_embed_dim", "target_embed_dim"):
                if getattr(self, name) != fields[name].default:
                    raise ValueError(f"{name} only applies to feature_aggregation: reference (concat keeps the native channels)")
        elif self.layer_weights is not None:
            raise ValueError("layer_weights only applies to feature_aggregation: concat")
        return self

    def squared_distances(self) -> bool:
        return self.distance == "squared"

    def describe_features(self) -> str:
        """One line for the report's protocol."""
        taps = f"{self.backbone} taps {', '.join(self.layers)}"
        if self.feature_aggregation == "reference":
            return (f"reference (PatchCore code's _embed): {taps}, {self.patch_size}x{self.patch_size} unfold, "
                    f"adaptive avg pool to {self.pretrain_embed_dim} per layer, then to {self.target_embed_dim}")
        w = "" if self.layer_weights is None else f", layer weights {self.layer_weights}"
        return (f"concat (anomalib's PatchCore): {taps}, {self.patch_size}x{self.patch_size} mean "
                f"(zero padding counted), native channels concatenated{w}")


class PatchCoreParams(CNNPatchParams):
    reweight_neighbors: int | None = Field(
        None, ge=1, description="paper eq. 7 image-score reweighting with b neighbours (None or 1: plain max, as the reference code)"
    )
    rotations: list[float] | None = Field(
        None, description="memory-bank augmentation: every training image also fitted rotated by these angles in degrees "
        "(0 = as it is; reflected border), for parts that come in any orientation; None: no copies")

    @field_validator("rotations")
    @classmethod
    def _rotation_set(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("an empty rotation set fits no image: omit rotations, or list the angles, e.g. [0, 90, 180, 270]")
        if any(not 0 <= a < 360 for a in v):
            raise ValueError(f"angles are degrees in [0, 360); got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"an angle is listed twice: {v}")
        if 0 not in v:
            raise ValueError(f"include 0 (the training images as they are); got {v}")
        return v

    @model_validator(mode="after")
    def _reweight_needs_max(self):
        # eq. 7 reweights s* = the max patch score; with another aggregation it would silently replace it
        if self.reweight_neighbors not in (None, 1) and self.aggregation != "max":
            raise ValueError(f"reweight_neighbors (paper eq. 7) reweights the max patch score: it needs aggregation: max "
                             f"(aggregation is {self.aggregation})")
        if self.tiling is not None and self.reweight_neighbors not in (None, 1):
            raise ValueError("reweight_neighbors does not apply with tiling (the image score comes from the stitched map)")
        return self


def make_cnn_embedder(p: CNNPatchParams) -> LocalPatchEmbedder | ConcatPatchEmbedder:
    extractor = FeatureExtractor(p.backbone, p.layers, p.weights)
    if p.feature_aggregation == "concat":
        return ConcatPatchEmbedder(extractor, p.patch_size, p.layer_weights).to(p.device)
    return LocalPatchEmbedder(extractor, p.patch_size, p.pretrain_embed_dim, p.target_embed_dim).to(p.device)


@register_detector
class PatchCore(PatchKNNDetector):
    """PatchCore: coreset memory of locally aware patch features, 1-NN patch distances (Roth et al. 2022)."""

    name = "patchcore"
    Params = PatchCoreParams

    def _make_embedder(self):
        return make_cnn_embedder(self.params_)

    def _references(self, images: list):
        angles = self.params_.rotations
        return (RotatedImages(images, angles) if angles else images), None

    def protocol(self) -> dict[str, str]:
        out = super().protocol()
        b = self.params_.reweight_neighbors
        if b not in (None, 1):
            out["image_score"] = f"paper eq. 7: max patch score reweighted by its nearest memory entry's {b} neighbours"
        if self.params_.rotations:
            out["bank_augmentation"] = f"every training image also rotated by {self.params_.rotations} degrees"
        return out

    def _image_scores(self, patch: np.ndarray, dists, idx, feats, maps) -> np.ndarray:
        b = self.params_.reweight_neighbors
        if b is None or b == 1:
            # b=1: N_b(m*) = {m*} and eq. 7's weight would be 1 - softmax([d]) = 0 for every image;
            # anomalib likewise returns the plain max for one neighbour.
            return super()._image_scores(patch, dists, idx, feats, maps)
        return self.reweighted_scores(patch, idx, feats, b)

    def reweighted_scores(self, patch: np.ndarray, idx: np.ndarray, feats: np.ndarray, b: int) -> np.ndarray:
        """Paper eq. 7 image scores [B] with ``b`` neighbours (fitted model; ``idx`` from the 1-NN search)."""
        # Paper eq. 7: s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*, where m* is
        # the nearest memory entry of the most anomalous test patch and N_b(m*) its b nearest
        # memory entries (m* included, as anomalib does). Softmax keeps the exponentials stable.
        # The weight uses Euclidean distances as in the paper; s* is in the chosen ``distance`` scale.
        B = len(patch)
        flat = patch.reshape(B, -1)
        top = flat.argmax(1)
        D = feats.shape[-1]
        test_feats = feats.reshape(B, -1, D)[np.arange(B), top]  # (B, D)
        m_star = self.memory_[idx.reshape(B, -1, idx.shape[-1])[np.arange(B), top, 0]]
        _, support = self._knn().search(m_star, k=min(b, len(self.memory_)))
        mem = torch.from_numpy(self.memory_[support])  # (B, b, D)
        d = torch.linalg.vector_norm(mem - torch.from_numpy(test_feats)[:, None], dim=-1)
        w = 1 - torch.softmax(d, dim=1)[:, 0]
        return (w.numpy() * flat.max(1)).astype(np.float32)
