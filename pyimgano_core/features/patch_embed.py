"""PatchCore's locally aware patch features (Roth et al. 2022, Sec. 3.1), as embedders.

Two named ways to aggregate the tapped layers into one patch feature (``feature_aggregation``):

``reference`` (:class:`LocalPatchEmbedder`) follows the reference implementation
(amazon-science/patchcore-inspection, ``_embed``): each tapped layer is unfolded into k x k
neighbourhoods (zero padding ``(k-1)//2``, stride 1), deeper layers are bilinearly upsampled to
the patch grid of the first tap, each layer's (C*k*k) vector is adaptive-average-pooled to
``pretrain_dim``, and the layers' vectors are concatenated and pooled to ``target_dim``. Every
layer gets the same share of the feature whatever its channel count. For odd k the grid is the
feature map's; for even k it is one smaller per side (the reference's ``PatchMaker`` pads
``(k-1)//2`` on both sides), and position (i, j) aggregates rows i-(k-1)//2 .. i+k//2 of the map.

``concat`` (:class:`ConcatPatchEmbedder`) is anomalib's PatchCore (``PatchcoreModel``:
``AvgPool2d(3, 1, 1)`` on each tap, deeper taps bilinearly resized to the first tap's grid,
channels concatenated): native channel counts, so a layer's share of a squared distance grows
with its channels (MobileNetV2 features.6 + features.13: 32 + 96 = 128-d, the deeper tap ~3/4).
Optional ``layer_weights`` scale each tap's block before concatenation (its squared-distance
share by w**2).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
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
        unfolded = []
        for fmap in maps:
            # (B, C, h_l, w_l) -> (B, C*k*k, gh, gw): the k x k neighbourhood of every position
            c = fmap.shape[1]
            hl, wl = (s + 2 * pad - k + 1 for s in fmap.shape[-2:])
            if hl < 1 or wl < 1:
                raise ConfigError(f"detector.params.patch_size={k} is larger than a {tuple(fmap.shape[-2:])} feature map; use a larger image_size")
            unfolded.append(F.unfold(fmap, kernel_size=k, padding=pad, stride=1).view(B, c * k * k, hl, wl))
        mix = pooling_mix(tuple(u.shape[1] for u in unfolded), self.pretrain_dim, self.target_dim)
        if mix is None:  # strong down-pooling (long bins): the two pooling stages one after the other
            per_layer = []
            for u in unfolded:
                if u.shape[-2:] != (h, w):
                    u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
                per_layer.append(adaptive_avg_pool_channels(u, self.pretrain_dim))  # (B, pretrain_dim, h, w)
            x = adaptive_avg_pool_channels(torch.cat(per_layer, dim=1), self.target_dim)  # layer-major concat, as the reference
            return x.permute(0, 2, 3, 1).contiguous()  # (B, h, w, target_dim)
        # Both pooling stages are one fixed linear map of each layer's channels (a few terms per output
        # channel), and bilinear resizing is the same linear map on every channel, so the two commute:
        # mix each layer's channels at its own resolution, then resize only the channels it feeds
        # (MobileNetV2 features.13: 512 instead of 864 channels, mixed at 14x14 instead of 28x28).
        x = torch.zeros(B, self.target_dim, h, w, dtype=unfolded[0].dtype, device=unfolded[0].device)
        for u, (rows, idx, wts) in zip(unfolded, mix):
            y = u.index_select(1, idx[0].to(u.device)).mul_(wts[0].to(u.device).view(1, -1, 1, 1))
            for t in range(1, len(idx)):
                y.addcmul_(u.index_select(1, idx[t].to(u.device)), wts[t].to(u.device).view(1, -1, 1, 1))
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            x.index_add_(1, rows.to(u.device), y)
        return x.permute(0, 2, 3, 1).contiguous()  # (B, h, w, target_dim)


_MAX_TERMS = 16  # input channels per output channel up to which the composite mix is used


@functools.lru_cache(maxsize=32)
def pooling_mix(lengths: tuple[int, ...], pretrain: int, target: int):
    """The reference's two pooling stages (each layer's L_l channels -> ``pretrain``, layers concatenated
    layer-major, -> ``target``) as one sparse linear map per layer: [(rows, idx [T, R], weights [T, R])],
    output channel ``rows[r]`` receiving ``sum_t weights[t, r] * u[idx[t, r]]`` from that layer (weight
    = 1 / (layer bin length * target bin length), summed where bins share a channel; padding terms have
    weight 0). None when some output channel needs more than ``_MAX_TERMS`` terms."""
    lengths = tuple(int(v) for v in lengths)
    t_start, t_len = adaptive_pool_bins(len(lengths) * pretrain, target)
    layer_bins = [adaptive_pool_bins(n, pretrain) for n in lengths]
    terms: list[dict[int, dict[int, float]]] = [{} for _ in lengths]  # layer -> out channel -> {input channel: weight}
    for o in range(target):
        for m in range(int(t_start[o]), int(t_start[o] + t_len[o])):
            layer, j = divmod(m, pretrain)
            start, n = layer_bins[layer][0][j], layer_bins[layer][1][j]
            row = terms[layer].setdefault(o, {})
            for i in range(int(start), int(start + n)):
                row[i] = row.get(i, 0.0) + 1.0 / (float(n) * float(t_len[o]))
    out = []
    for per_out in terms:  # every layer feeds some output channel (target >= 1, layers of equal share)
        width = max(len(r) for r in per_out.values())
        if width > _MAX_TERMS:
            return None
        rows = np.array(sorted(per_out), dtype=np.int64)
        idx, wts = np.zeros((width, len(rows)), np.int64), np.zeros((width, len(rows)), np.float32)
        for r, o in enumerate(rows):
            for t, (i, wt) in enumerate(sorted(per_out[int(o)].items())):
                idx[t, r], wts[t, r] = i, wt
        out.append((torch.from_numpy(rows), torch.from_numpy(idx), torch.from_numpy(wts)))
    return out


def adaptive_pool_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(start [out], length [out]) of ``adaptive_avg_pool1d``'s bins: bin i covers
    [floor(i * L / O), ceil((i + 1) * L / O)) (torch's rule)."""
    i = np.arange(out)
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)
    return start.astype(np.int64), (end - start).astype(np.int64)


def adaptive_avg_pool_channels(x: torch.Tensor, out: int) -> torch.Tensor:
    """``F.adaptive_avg_pool1d`` of every position's channel vector: [B, C, h, w] -> [B, out, h, w].

    The same numbers as pooling the (B*h*w, 1, C) rows with torch (bin i sums its elements in
    order, then divides by the bin length; tests/test_backbones.py), but as a few whole-plane
    gathers along the channel axis: on PatchCore's bins of 1-3 elements this is several times
    faster than torch's generic kernel and needs no (B*h*w, C) transpose. Bins longer than
    8 elements (a strong down-pooling) use torch's kernel itself.
    """
    length = x.shape[1]
    if length == out:
        return x
    start, lengths = adaptive_pool_bins(length, out)
    if lengths.max() > 8:
        B, _, h, w = x.shape
        rows = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(B * h * w, 1, length), out)
        return rows.view(B, h, w, out).permute(0, 3, 1, 2)
    acc = x.index_select(1, torch.from_numpy(start))
    for j in range(1, int(lengths.max())):  # the j-th element of every bin that has one
        longer = np.flatnonzero(lengths > j)
        acc.index_add_(1, torch.from_numpy(longer), x.index_select(1, torch.from_numpy(start[longer] + j)))
    return acc / torch.from_numpy(lengths.astype(np.float32)).to(x.device).view(1, -1, 1, 1)


def concat_taps(maps: Sequence[torch.Tensor], patch_size: int = 3, weights: Sequence[float] | None = None) -> torch.Tensor:
    """k x k mean of each tap (zero padding counted, as ``nn.AvgPool2d(k, 1, k // 2)``), deeper taps
    resized bilinearly to the first tap's grid, times its weight, channels concatenated:
    [(B, C_l, h_l, w_l)] -> (B, h, w, sum C_l). Plain tensor ops (traceable)."""
    h, w = maps[0].shape[-2:]
    out = []
    for i, m in enumerate(maps):
        # odd k keeps the grid (anomalib: k=3, padding 1); count_include_pad=True is AvgPool2d's default
        m = F.avg_pool2d(m, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m if weights is None else m * float(weights[i]))
    return torch.cat(out, 1).permute(0, 2, 3, 1)


class ConcatPatchEmbedder(nn.Module):
    """float [B, 3, H, W] in [0, 1] -> [B, h, w, sum of the taps' channels] (anomalib's PatchCore features)."""

    def __init__(self, extractor: FeatureExtractor, patch_size: int = 3, layer_weights: Sequence[float] | None = None):
        super().__init__()
        if patch_size % 2 == 0:
            raise ConfigError(f"detector.params.patch_size={patch_size}: feature_aggregation concat needs an odd patch_size "
                              "(a k x k mean centred on each position)")
        if layer_weights is not None and len(layer_weights) != len(extractor.channels):
            raise ConfigError(f"detector.params.layer_weights has {len(layer_weights)} entries for "
                              f"{len(extractor.channels)} tapped layers")
        self.extractor = extractor
        self.patch_size = patch_size
        self.layer_weights = None if layer_weights is None else [float(v) for v in layer_weights]
        self.target_dim = sum(extractor.channels)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return concat_taps(self.extractor(pixels), self.patch_size, self.layer_weights).contiguous()
