"""PatchCore's locally aware patch features (Roth et al. 2022, Sec. 3.1), as an embedder.

Follows the reference implementation (amazon-science/patchcore-inspection, ``_embed``):
each tapped layer is unfolded into 3x3 neighbourhoods, deeper layers are bilinearly upsampled
to the grid of the first tap, each layer's (C*3*3) vector is adaptive-average-pooled to
``pretrain_dim``, and the layers' vectors are concatenated and pooled to ``target_dim``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureExtractor


class LocalPatchEmbedder(nn.Module):
    """float [B, 3, H, W] in [0, 1] -> patch features [B, h, w, target_dim] on the first tap's grid."""

    def __init__(self, extractor: FeatureExtractor, patch_size: int = 3, pretrain_dim: int = 1024, target_dim: int = 1024):
        super().__init__()
        self.extractor = extractor
        self.patch_size, self.pretrain_dim, self.target_dim = patch_size, pretrain_dim, target_dim

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(pixels)
        B, _, h, w = maps[0].shape
        k = self.patch_size
        per_layer = []
        for fmap in maps:
            # (B, C, h_l, w_l) -> (B, C*k*k, h_l, w_l): the k x k neighbourhood of every position
            c, hl, wl = fmap.shape[1:]
            u = F.unfold(fmap, kernel_size=k, padding=k // 2, stride=1).view(B, c * k * k, hl, wl)
            if (hl, wl) != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            u = u.permute(0, 2, 3, 1).reshape(B * h * w, 1, c * k * k)
            per_layer.append(F.adaptive_avg_pool1d(u, self.pretrain_dim))  # (N, 1, pretrain_dim)
        x = torch.cat(per_layer, dim=2)  # (N, 1, n_layers * pretrain_dim), layer-major as the reference
        x = F.adaptive_avg_pool1d(x, self.target_dim)
        return x.view(B, h, w, self.target_dim)
