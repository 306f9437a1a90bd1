"""Normalizing-flow building blocks of MSFlow, in plain torch (no FrEIA).

MSFlow (Zhou et al., "MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly
Detection", TNNLS 2024; reference code cool-xuan/msflow) maps each feature scale through its own
*parallel flow* of conditional affine coupling blocks, then couples all scales in one *fusion
flow*. Every module maps ``x -> (z, log|det dz/dx|)`` per sample and has an exact ``inverse``.

- :class:`ConditionalCoupling`: the reference's parallel-flow block (FrEIA ``AllInOneBlock`` as
  configured in ``models/flow_models.py``: one-sided affine coupling conditioned on a positional
  encoding, subnet conv3x3 -> LayerNorm -> ReLU -> conv3x3, soft clamp ``alpha * tanh``, a
  learned global affine with a softplus scale, then a fixed channel permutation).
- :class:`FusionCoupling`: the reference's ``FusionCouplingLayer`` (``models/freia_utils.py``):
  a two-sided coupling whose subnet sees all scales at once (pooled to the coarsest grid),
  soft clamp ``alpha * 0.636 * atan(s / alpha)``.
- :class:`MultiScaleFlow`: parallel flows + per-scale permutation + fusion coupling.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Feats = list[torch.Tensor]


def positional_encoding_2d(channels: int, h: int, w: int) -> torch.Tensor:
    """Sine/cosine encoding [channels, h, w]: first half encodes the column, second half the row.

    As in the reference's ``utils.positionalencoding2d`` (the transformer encoding, 1e4 base).
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(1e4) / half))  # (half/2,)
    col = torch.arange(w, dtype=torch.float32)[:, None] * freq  # (w, half/2)
    row = torch.arange(h, dtype=torch.float32)[:, None] * freq  # (h, half/2)
    pe = torch.empty(channels, h, w)
    pe[0:half:2] = col.sin().T[:, None, :].expand(-1, h, -1)
    pe[1:half:2] = col.cos().T[:, None, :].expand(-1, h, -1)
    pe[half::2] = row.sin().T[:, :, None].expand(-1, -1, w)
    pe[half + 1 :: 2] = row.cos().T[:, :, None].expand(-1, -1, w)
    return pe


class ConvLNSubnet(nn.Module):
    """conv3x3(c_in -> c_in) -> LayerNorm over channels -> ReLU -> conv3x3(c_in -> c_out).

    The reference's ``subnet_conv_ln`` (hidden width = input width).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.norm = nn.LayerNorm(c_in)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(F.relu(h))


class ConditionalCoupling(nn.Module):
    """One conditional affine coupling block with global affine and a fixed permutation.

    Split ``x`` into a passive part ``x1`` (first ``C - C//2`` channels) and an active part
    ``x2``; ``a = 0.1 * subnet([x1, cond])``; ``x2 <- x2 * exp(alpha * tanh(a_s)) + a_t``; then
    ``u <- u * g + b`` with ``g = 0.1 * softplus_{beta=0.5}(gamma)`` (``gamma`` initialised so that
    ``g = 1``), and finally ``y = u[:, perm]``. The 0.1 factor and the initialisation follow FrEIA's
    ``AllInOneBlock`` with ``global_affine_type='SOFTPLUS'``, which the reference uses.
    """

    def __init__(self, channels: int, cond_channels: int, clamp: float, perm: np.ndarray):
        super().__init__()
        self.c1, self.c2 = channels - channels // 2, channels // 2
        self.clamp = float(clamp)
        self.subnet = ConvLNSubnet(self.c1 + cond_channels, 2 * self.c2)
        init = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)  # softplus_{0.5}(init) * 0.1 == 1
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), init))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
        if sorted(perm.tolist()) != list(range(channels)):
            raise ValueError("perm must be a permutation of range(channels)")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coeffs(self, x1: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = 0.1 * self.subnet(torch.cat([x1, cond], 1))
        return self.clamp * torch.tanh(a[:, : self.c2]), a[:, self.c2 :]

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x.split([self.c1, self.c2], 1)
        s, t = self._coeffs(x1, cond)
        u = torch.cat([x1, x2 * torch.exp(s) + t], 1)
        g = self._scale()
        y = (u * g + self.global_offset)[:, self.perm]
        hw = x.shape[2] * x.shape[3]
        return y, s.sum((1, 2, 3)) + hw * torch.log(g).sum()

    def inverse(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        u = (y[:, self.inv_perm] - self.global_offset) / self._scale()
        x1, u2 = u.split([self.c1, self.c2], 1)
        s, t = self._coeffs(x1, cond)
        return torch.cat([x1, (u2 - t) * torch.exp(-s)], 1)


class ParallelFlow(nn.Module):
    """A chain of :class:`ConditionalCoupling` blocks on one feature scale."""

    def __init__(self, channels: int, cond_channels: int, n_blocks: int, clamp: float, rng: np.random.Generator):
        super().__init__()
        self.blocks = nn.ModuleList(
            ConditionalCoupling(channels, cond_channels, clamp, rng.permutation(channels)) for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(len(x))
        for block in self.blocks:
            x, j = block(x, cond)
            logdet = logdet + j
        return x, logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, cond)
        return z


class FusionSubnet(nn.Module):
    """The fusion flow's subnet: all scales mixed on the coarsest grid, then per-scale s and t.

    Reference ``FusionSTNets`` + ``FusionNet(add=True)``: average-pool every scale to the last
    (coarsest) grid, concat, conv3x3 -> LayerNorm -> ReLU -> conv3x3 -> ReLU (hidden width a
    quarter of the input), split back per scale, upsample bilinearly (align_corners=True), add
    to the input as a residual; then one conv3x3 for ``s`` and one for ``t`` per scale.
    """

    def __init__(self, c_in: list[int], c_out: list[int]):
        super().__init__()
        total = sum(c_in)
        mid = max(1, total // 4)
        self.c_in = list(c_in)
        self.conv1 = nn.Conv2d(total, mid, 3, 1, 1)
        self.norm = nn.LayerNorm(mid)
        self.conv2 = nn.Conv2d(mid, total, 3, 1, 1)
        self.conv_s = nn.ModuleList(nn.Conv2d(i, o, 3, 1, 1) for i, o in zip(c_in, c_out))
        self.conv_t = nn.ModuleList(nn.Conv2d(i, o, 3, 1, 1) for i, o in zip(c_in, c_out))

    def forward(self, xs: Feats) -> tuple[Feats, Feats]:
        coarse = xs[-1].shape[-2:]
        h = torch.cat([F.adaptive_avg_pool2d(x, coarse) for x in xs], 1)
        h = self.norm(self.conv1(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.relu(self.conv2(F.relu(h)))
        mixed = [
            x + F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=True)
            for x, m in zip(xs, h.split(self.c_in, 1))
        ]
        return [c(m) for c, m in zip(self.conv_s, mixed)], [c(m) for c, m in zip(self.conv_t, mixed)]


class FusionCoupling(nn.Module):
    """Two-sided affine coupling across scales (reference ``FusionCouplingLayer``).

    Every scale splits into ``x1`` (first ``C//2`` channels) and ``x2``. ``y1 = x1 * e(s2) + t2``
    with ``(s2, t2)`` from all ``x2``; then ``y2 = x2 * e(s1) + t1`` with ``(s1, t1)`` from all
    ``y1``. ``log e(s) = alpha * 0.636 * atan(s / alpha)`` (the reference's constant, ~2/pi).
    """

    def __init__(self, channels: list[int], clamp: float):
        super().__init__()
        self.s1 = [c // 2 for c in channels]
        self.s2 = [c - c // 2 for c in channels]
        self.clamp = float(clamp)
        self.net_from_x2 = FusionSubnet(self.s2, self.s1)
        self.net_from_y1 = FusionSubnet(self.s1, self.s2)

    def _log_e(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def _split(self, xs: Feats) -> tuple[Feats, Feats]:
        parts = [x.split([a, b], 1) for x, a, b in zip(xs, self.s1, self.s2)]
        return [p[0] for p in parts], [p[1] for p in parts]

    def forward(self, xs: Feats) -> tuple[Feats, torch.Tensor]:
        x1, x2 = self._split(xs)
        s2, t2 = self.net_from_x2(x2)
        y1 = [a * torch.exp(self._log_e(s)) + t for a, s, t in zip(x1, s2, t2)]
        s1, t1 = self.net_from_y1(y1)
        y2 = [b * torch.exp(self._log_e(s)) + t for b, s, t in zip(x2, s1, t1)]
        logdet = sum(self._log_e(s).sum((1, 2, 3)) for s in s1 + s2)
        return [torch.cat(p, 1) for p in zip(y1, y2)], logdet

    def inverse(self, ys: Feats) -> Feats:
        y1, y2 = self._split(ys)
        s1, t1 = self.net_from_y1(y1)
        x2 = [(b - t) * torch.exp(-self._log_e(s)) for b, s, t in zip(y2, s1, t1)]
        s2, t2 = self.net_from_x2(x2)
        x1 = [(a - t) * torch.exp(-self._log_e(s)) for a, s, t in zip(y1, s2, t2)]
        return [torch.cat(p, 1) for p in zip(x1, x2)]


class MultiScaleFlow(nn.Module):
    """MSFlow's flow: a parallel flow per scale (conditioned on a positional encoding), a fixed
    random channel permutation per scale, then the fusion coupling across scales.

    ``forward(feats)`` maps per-scale features [B, C_l, h_l, w_l] (finest first) to latents of
    the same shapes and the total log-determinant [B]. Permutations are drawn from
    ``np.random.default_rng(seed)`` and saved as buffers, so a saved flow reloads exactly.
    """

    def __init__(self, channels: list[int], cond_channels: int, blocks: list[int], clamp: float, seed: int = 0):
        super().__init__()
        if len(channels) != len(blocks):
            raise ValueError(f"one block count per scale: {len(channels)} scales, {len(blocks)} counts")
        rng = np.random.default_rng(seed)
        self.cond_channels = int(cond_channels)
        self.parallel = nn.ModuleList(ParallelFlow(c, cond_channels, n, clamp, rng) for c, n in zip(channels, blocks))
        for i, c in enumerate(channels):
            perm = torch.as_tensor(rng.permutation(c), dtype=torch.long)
            self.register_buffer(f"fusion_perm{i}", perm)
            self.register_buffer(f"fusion_inv_perm{i}", torch.argsort(perm))
        self.fusion = FusionCoupling(list(channels), clamp)

    def _cond(self, x: torch.Tensor) -> torch.Tensor:
        pe = positional_encoding_2d(self.cond_channels, x.shape[2], x.shape[3]).to(x)
        return pe.unsqueeze(0).expand(len(x), -1, -1, -1)

    def forward(self, feats: Feats) -> tuple[Feats, torch.Tensor]:
        zs, logdet = [], feats[0].new_zeros(len(feats[0]))
        for i, (x, flow) in enumerate(zip(feats, self.parallel)):
            z, j = flow(x, self._cond(x))
            zs.append(z[:, getattr(self, f"fusion_perm{i}")])
            logdet = logdet + j
        zs, j = self.fusion(zs)
        return zs, logdet + j

    def inverse(self, zs: Feats) -> Feats:
        xs = self.fusion.inverse(zs)
        return [
            flow.inverse(x[:, getattr(self, f"fusion_inv_perm{i}")], self._cond(x))
            for i, (x, flow) in enumerate(zip(xs, self.parallel))
        ]


def nll(zs: Feats, logdet: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood up to the constant: 0.5 * |z|^2 - log|det| (reference train.py)."""
    return sum(0.5 * (z * z).sum((1, 2, 3)) for z in zs) - logdet


def log_prob(zs: Feats, logdet: torch.Tensor) -> torch.Tensor:
    """Exact per-sample log-density under the standard normal base distribution [B]."""
    dims = sum(z[0].numel() for z in zs)
    return -nll(zs, logdet) - 0.5 * dims * math.log(2 * math.pi)
