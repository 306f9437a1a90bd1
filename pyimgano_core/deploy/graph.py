"""The torch module that export-onnx traces: a fitted patch-kNN model as one fixed-size graph.

    image uint8 [B, H, W, 3] RGB
      -> float / 255 -> backbone (ImageNet normalisation inside) -> patch features [B*h*w, D]
      -> nearest memory entry (matmul + reduce; SoftPatch: times the matched entry's weight,
         shared between near-tied entries by the torch path's own ``matched_weight``)
      -> patch scores [B, h, w] -> image score [B] (max | mean | topk_mean)
      -> bilinear upsampling to H x W + Gaussian blur -> map [B, H, W]

Every step re-states, with ONNX-friendly operators, what the torch path computes, so the
exported graph equals it up to float rounding (export-onnx checks this before writing):

* PatchCore's ``F.unfold`` neighbourhoods become shifted slices of the zero-padded map (same
  channel order c * k * k + ky * k + kx); ``F.adaptive_avg_pool1d`` becomes a gather of each
  bin's (at most a few) elements summed in order and divided by the bin length, as torch does.
* ``upsample`` in patchknn.py runs ``cv2.resize(INTER_LINEAR)`` (half-pixel centres = ONNX
  ``Resize`` linear/half_pixel) and ``cv2.GaussianBlur(BORDER_REFLECT)``: here the same kernel
  (``cv2.getGaussianKernel``), rows then columns, with cv2's reflect border (edge pixel
  repeated: ``cba|abc``) built by an index gather, because ONNX ``Pad(reflect)`` is reflect-101.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..detectors.softpatch import TIE_NEIGHBOURS, matched_weight
from ..features.vit import pool_and_stack


def reflect_indices(n: int, pad: int) -> np.ndarray:
    """Indices of a length-``n`` axis padded by ``pad`` on each side with cv2's BORDER_REFLECT."""
    idx = np.arange(-pad, n + pad)
    period = 2 * n
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - 1 - idx, idx).astype(np.int64)


def adaptive_pool_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [K, out], lengths [out]) of ``adaptive_avg_pool1d``'s bins (torch's start/end rule).

    Bin i covers [floor(i * L / O), ceil((i + 1) * L / O)); rows of ``indices`` past a bin's
    length point at its first element and are masked out.
    """
    i = np.arange(out)
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)
    lengths = end - start
    K = int(lengths.max())
    idx = start[None, :] + np.arange(K)[:, None]
    idx = np.where(np.arange(K)[:, None] < lengths[None, :], idx, start[None, :])
    return idx.astype(np.int64), lengths.astype(np.int64)


class AdaptiveAvgPool1d(nn.Module):
    """``F.adaptive_avg_pool1d`` over the last axis from Gather/Add/Div (any input/output sizes)."""

    def __init__(self, length: int, out: int):
        super().__init__()
        idx, lengths = adaptive_pool_bins(length, out)
        self.register_buffer("idx", torch.from_numpy(idx), persistent=False)
        self.register_buffer("valid", torch.from_numpy(np.arange(len(idx))[:, None] < lengths[None, :]), persistent=False)
        self.register_buffer("lengths", torch.from_numpy(lengths.astype(np.float32)), persistent=False)
        self.identity = length == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        acc = torch.index_select(x, -1, self.idx[0])
        for j in range(1, len(self.idx)):  # sequential sum, as torch's kernel accumulates each bin
            acc = acc + torch.where(self.valid[j], torch.index_select(x, -1, self.idx[j]), torch.zeros((), dtype=x.dtype))
        return acc / self.lengths


class LocalPatchHead(nn.Module):
    """PatchCore's locally aware patch features (features/patch_embed.py) from exportable ops."""

    def __init__(self, embedder):
        super().__init__()
        self.extractor = embedder.extractor
        self.k = int(embedder.patch_size)
        self.target_dim = int(embedder.target_dim)
        dims = [c * self.k * self.k for c in self.extractor.channels]
        self.pools = nn.ModuleList(AdaptiveAvgPool1d(d, int(embedder.pretrain_dim)) for d in dims)
        self.final = AdaptiveAvgPool1d(len(dims) * int(embedder.pretrain_dim), self.target_dim)

    def _unfold(self, fmap: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, C, k*k, gh, gw) -> (B, C*k*k, gh, gw): channel c*k*k + ky*k + kx, as
        # F.unfold(padding=(k-1)//2) (the reference's PatchMaker; for even k the grid is one smaller)
        k, p = self.k, (self.k - 1) // 2
        gh, gw = (s + 2 * p - k + 1 for s in fmap.shape[-2:])
        padded = F.pad(fmap, (p, p, p, p))
        shifts = [padded[:, :, ky : ky + gh, kx : kx + gw] for ky in range(k) for kx in range(k)]
        u = torch.stack(shifts, dim=2)
        return u.reshape(fmap.shape[0], fmap.shape[1] * k * k, gh, gw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(pixels)
        h, w = (s + 2 * ((self.k - 1) // 2) - self.k + 1 for s in maps[0].shape[-2:])
        per_layer = []
        for fmap, pool in zip(maps, self.pools):
            u = self._unfold(fmap)
            if u.shape[-2:] != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            per_layer.append(pool(u.permute(0, 2, 3, 1)))  # (B, h, w, pretrain_dim)
        return self.final(torch.cat(per_layer, dim=-1))  # (B, h, w, target_dim), layer-major as the reference


class CNNTapHead(nn.Module):
    """AnomalyDINO's CNN stand-in (features/vit.py ``CNNTapEmbedder``): 3x3 means of each tap, concatenated."""

    def __init__(self, embedder):
        super().__init__()
        self.extractor = embedder.extractor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pool_and_stack(self.extractor(pixels))


class GaussianBlur(nn.Module):
    """``cv2.GaussianBlur(m, (2r+1, 2r+1), sigma, borderType=BORDER_REFLECT)`` on [B, H, W] maps, r = int(4 sigma + 0.5)."""

    def __init__(self, sigma: float, hw: tuple[int, int]):
        super().__init__()
        r = int(4.0 * sigma + 0.5)
        kernel = cv2.getGaussianKernel(2 * r + 1, sigma, cv2.CV_64F).astype(np.float32).ravel()
        self.register_buffer("kx", torch.from_numpy(kernel).view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", torch.from_numpy(kernel).view(1, 1, -1, 1), persistent=False)
        self.register_buffer("rows", torch.from_numpy(reflect_indices(hw[0], r)), persistent=False)
        self.register_buffer("cols", torch.from_numpy(reflect_indices(hw[1], r)), persistent=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        x = m.unsqueeze(1)  # (B, 1, H, W)
        x = F.conv2d(torch.index_select(x, 3, self.cols), self.kx)  # rows first, as cv2's separable filter
        x = F.conv2d(torch.index_select(x, 2, self.rows), self.ky)
        return x.squeeze(1)


class PatchKNNGraph(nn.Module):
    """uint8 image [B, H, W, 3] -> (score [B], map [B, H, W], patch_scores [B, h, w])."""

    def __init__(self, head: nn.Module, memory: np.ndarray, *, metric: str, weights: np.ndarray | None, squared: bool,
                 aggregation: str, k_top: int, blur_sigma: float, input_hw: tuple[int, int]):
        super().__init__()
        self.head, self.metric, self.aggregation, self.squared = head, metric, aggregation, squared
        bank = torch.from_numpy(np.ascontiguousarray(memory, dtype=np.float32))
        if metric == "cosine":  # KNNIndex L2-normalises the bank
            bank = bank / torch.clamp(torch.linalg.vector_norm(bank, dim=1, keepdim=True), min=1e-12)
        self.register_buffer("bank_t", bank.T.contiguous(), persistent=False)  # (D, M)
        self.register_buffer("bank_sq", (bank * bank).sum(1), persistent=False)
        self.register_buffer("weights", None if weights is None else torch.from_numpy(np.asarray(weights, np.float32)), persistent=False)
        self.k_top = int(k_top)
        self.input_hw = tuple(int(v) for v in input_hw)
        self.blur = GaussianBlur(blur_sigma, self.input_hw) if blur_sigma > 0 else None

    def _nearest(self, q: torch.Tensor) -> torch.Tensor:
        """Patch scores [N] from features [N, D]: KNNIndex.search (k=1) then _score_patches."""
        if self.metric == "cosine":  # 1 - cosine similarity, queries normalised as F.normalize
            q = q / torch.clamp(torch.linalg.vector_norm(q, dim=1, keepdim=True), min=1e-12)
            return 1.0 - (q @ self.bank_t).amax(1)
        sim = q @ self.bank_t  # (N, M)
        # |q - m|^2 = |q|^2 - 2 q.m + |m|^2, in KNNIndex's order; rounding negatives clamped before the sqrt
        score = sim * -2.0 + self.bank_sq + (q * q).sum(1, keepdim=True)
        if self.weights is None:
            d2 = torch.clamp(score.amin(1), min=0.0)
            return d2 if self.squared else torch.sqrt(d2)
        # SoftPatch: the k nearest, so that (near-)tied entries share the weight as in the torch path
        v, i = torch.topk(score, min(TIE_NEIGHBOURS, score.shape[1]), dim=1, largest=False)
        d2 = torch.clamp(v, min=0.0)
        return (d2[:, 0] if self.squared else torch.sqrt(d2[:, 0])) * matched_weight(d2, i, self.weights)

    def forward(self, image: torch.Tensor):
        pixels = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        feats = self.head(pixels)  # (B, h, w, D)
        B, h, w, D = feats.shape
        patch = self._nearest(feats.reshape(B * h * w, D)).reshape(B, h, w)
        flat = patch.reshape(B, h * w)
        if self.aggregation == "max":
            score = flat.amax(1)
        elif self.aggregation == "mean":
            score = flat.mean(1)
        else:
            score = torch.topk(flat, self.k_top, dim=1).values.mean(1)
        amap = F.interpolate(patch.unsqueeze(1), size=self.input_hw, mode="bilinear", align_corners=False).squeeze(1)
        if self.blur is not None:
            amap = self.blur(amap)
        return score, amap, patch
