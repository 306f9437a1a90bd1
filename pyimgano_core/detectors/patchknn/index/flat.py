"""``knn: {kind: flat}``: exact search with faiss ``IndexFlatL2`` / ``IndexFlatIP`` (the reference code's)."""
from __future__ import annotations

from typing import Literal

import numpy as np

from ....optional import require
from .base import IndexParams, NNIndex, register_index, to_distances


class FlatParams(IndexParams):
    kind: Literal["flat"] = "flat"


@register_index
class FlatIndex(NNIndex):
    kind = "flat"
    Params = FlatParams
    exact = True

    def fit(self, bank: np.ndarray) -> "FlatIndex":
        faiss = require("faiss", extra="faiss")
        bank = self.prepare(bank)
        self.index_ = (faiss.IndexFlatL2 if self.metric == "l2" else faiss.IndexFlatIP)(bank.shape[1])
        self.index_.add(bank)
        return self

    def search(self, queries, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = self.queries(queries)
        sims, idx = self.index_.search(q, min(k, self.index_.ntotal))
        return to_distances(sims, self.metric), idx.astype(np.int64)
