"""``knn: {kind: exact}``: the whole bank scanned with torch matrix products (the default)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import IndexParams, NNIndex, register_index


class ExactParams(IndexParams):
    kind: Literal["exact"] = "exact"


@register_index
class ExactIndex(NNIndex):
    """Exact search, |q - m|^2 = |q|^2 - 2 q.m + |m|^2 in blocks of queries (torch, on ``device``)."""

    kind = "exact"
    Params = ExactParams
    exact = True
    needs_faiss = False

    def fit(self, bank: np.ndarray) -> "ExactIndex":
        self.bank_ = torch.from_numpy(self.prepare(bank)).to(self.device)
        self.bank_sq_ = (self.bank_ * self.bank_).sum(1)
        return self

    def search(self, queries, k: int = 1, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(queries, dtype=torch.float32)
        bank, bank_sq = self.bank_, self.bank_sq_
        if chunk is None:  # queries per block: the (chunk, M) similarity matrix stays under ~256 MB
            chunk = max(1, min(4096, (1 << 26) // max(len(bank), 1)))
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        dists, inds = [], []
        for s in range(0, len(q), chunk):
            qc = q[s : s + chunk].to(self.device)
            sim = qc @ bank.T  # (chunk, M)
            if self.metric == "l2":
                # clamp rounding negatives before the sqrt
                score = sim.mul_(-2).add_(bank_sq).add_((qc * qc).sum(1, keepdim=True))
                v, i = torch.topk(score, k, dim=1, largest=False)
                v = v.clamp_(min=0).sqrt_()
            else:
                v, i = torch.topk(sim, k, dim=1, largest=True)
                v = 1.0 - v
            dists.append(v.cpu())
            inds.append(i.cpu())
        return torch.cat(dists).numpy(), torch.cat(inds).numpy()
