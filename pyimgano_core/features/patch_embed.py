"""PatchCore's locally aware patch features (Roth et al. 2022, Sec. 3.1), as an embedder.

Follows the reference implementation (amazon-science/patchcore-inspection, ``_embed``):
each tapped layer is unfolded into k x k neighbourhoods (zero padding ``(k-1)//2``, stride 1),
deeper layers are bilinearly upsampled to the patch grid of the first tap, each layer's
(C*k*k) vector is adaptive-average-pooled to ``pretrain_dim``, and the layers' vectors are
concatenated and pooled to ``target_dim``. For odd k the grid is the feature map's; for even k
it is one smaller per side (the reference's ``PatchMaker`` pads ``(k-1)//2`` on both sides), and
position (i, j) aggregates rows i-(k-1)//2 .. i+k//2 of the map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
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
        k = self.patch_size
        pad = (k - 1) // 2
        B = maps[0].shape[0]
        h, w = (s + 2 * pad - k + 1 for s in maps[0].shape[-2:])  # the first tap's patch grid
        per_layer = []
        for fmap in maps:
            # (B, C, h_l, w_l) -> (B, C*k*k, gh, gw): the k x k neighbourhood of every position
            c = fmap.shape[1]
            hl, wl = (s + 2 * pad - k + 1 for s in fmap.shape[-2:])
            if hl < 1 or wl < 1:
                raise ConfigError(f"detector.params.patch_size={k} is larger than a {tuple(fmap.shape[-2:])} feature map; use a larger image_size")
            u = F.unfold(fmap, kernel_size=k, padding=pad, stride=1).view(B, c * k * k, hl, wl)
            if (hl, wl) != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            u = u.permute(0, 2, 3, 1).reshape(B * h * w, 1, c * k * k)
            per_layer.append(F.adaptive_avg_pool1d(u, self.pretrain_dim))  # (N, 1, pretrain_dim)
        x = torch.cat(per_layer, dim=2)  # (N, 1, n_layers * pretrain_dim), layer-major as the reference
        x = F.adaptive_avg_pool1d(x, self.target_dim)
        return x.view(B, h, w, self.target_dim)
