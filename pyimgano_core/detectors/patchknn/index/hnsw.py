"""``knn: {kind: hnsw}``: a navigable small-world graph (Malkov & Yashunin 2018; faiss ``IndexHNSWFlat``)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ....optional import require
from .approximate import FaissIndex
from .base import IndexParams, faiss_threads, register_index


class HNSWParams(IndexParams):
    kind: Literal["hnsw"] = "hnsw"
    m: int = Field(32, ge=4, le=256, description="graph links per entry")
    ef_construction: int = Field(80, ge=8, le=4096, description="candidate list size while building")
    ef_search: int = Field(64, ge=1, le=4096, description="candidate list size per query (recall vs time)")


@register_index
class HNSWIndex(FaissIndex):
    kind = "hnsw"
    Params = HNSWParams

    def fit(self, bank: np.ndarray) -> "HNSWIndex":
        faiss = require("faiss", extra="faiss")
        self.bank_ = bank = self.prepare(bank)
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index_ = faiss.IndexHNSWFlat(bank.shape[1], self.params.m, metric)
        self.index_.hnsw.efConstruction = self.params.ef_construction
        # One build thread: faiss's parallel HNSW insertion depends on thread timing, and a seeded
        # fit must give the same graph (a saved index keeps loads identical anyway).
        with faiss_threads(faiss, 1):
            self.index_.add(bank)
        self._configure()
        return self

    def _configure(self) -> None:
        self.index_.hnsw.efSearch = self.params.ef_search

    def _expected(self, faiss):
        return faiss.IndexHNSWFlat, None
