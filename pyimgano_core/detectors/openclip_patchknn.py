"""Patch kNN on OpenCLIP patch tokens: AnomalyDINO's scoring with a CLIP vision tower.

The memory bank holds the L2-normalised last-block patch tokens (after the tower's final
LayerNorm, before the projection) of the reference images; a test patch scores its cosine
distance to the nearest one; image score = mean of the top 1% patch scores; maps are upsampled
bilinearly and blurred (sigma 4). The model and its pretrained tag are parameters
(``backbone: openclip:ViT-B-16``, ``weights: laion2b_s34b_b88k``; ``DEFAULT`` = ``openai``
where available). The position embedding is resampled to each input's patch grid. Needs the
``clip`` extra (``pip install "pyimgano[clip]"``).

Example
-------
>>> det = OpenCLIPPatchKNN(backbone="openclip:ViT-B-32", weights=None, image_size=224).fit(train_paths)
>>> pred = det.predict(test_paths)   # pred.maps [N, 224, 224] for square images
"""
from __future__ import annotations

from pydantic import Field

from .anomalydino import FoundationPatchKNN, FoundationPatchParams
from .base import register_detector


class OpenCLIPPatchKNNParams(FoundationPatchParams):
    backbone: str = Field("openclip:ViT-B-16", description="openclip:<model> (or timm:/torchvision: stand-ins)")
    mask_threshold: float | None = Field(
        None, description="first-PCA-component threshold in the chosen tower's feature units: required with masking "
        "(AnomalyDINO's 10 is a DINOv2 ViT-S/14 value and means nothing for a CLIP tower)")


@register_detector
class OpenCLIPPatchKNN(FoundationPatchKNN):
    name = "openclip_patchknn"
    Params = OpenCLIPPatchKNNParams
