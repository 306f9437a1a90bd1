"""``knn: {kind: ivf}``: an inverted file over k-means lists (faiss ``IndexIVFFlat``)."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ....errors import ConfigError
from ....optional import require
from .approximate import FaissIndex
from .base import IndexParams, faiss_threads, register_index


def default_nlist(n_entries: int) -> int:
    """IVF lists when not set: 4 * sqrt(entries) (faiss guideline 4..16 sqrt(N)), at most N / 39.

    faiss's k-means wants >= 39 training points per centroid; with fewer it still works but
    warns, so small banks get fewer, fuller lists.
    """
    return int(max(1, min(round(4 * math.sqrt(n_entries)), n_entries // 39)))


class IVFParams(IndexParams):
    kind: Literal["ivf"] = "ivf"
    nlist: int | None = Field(None, ge=1, description="k-means lists (None: 4*sqrt(entries)); at most the entries")
    nprobe: int = Field(8, ge=1, description="lists visited per query (recall vs time); at most nlist")

    @model_validator(mode="after")
    def _nprobe_within_nlist(self):
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} visits more lists than nlist={self.nlist}")
        return self


def check_lists(params: IVFParams, n_entries: int, what: str) -> int:
    """The number of lists for ``n_entries`` entries; a ConfigError when they cannot hold them."""
    nlist = default_nlist(n_entries) if params.nlist is None else params.nlist
    if nlist > n_entries:
        raise ConfigError(f"detector.params.knn.nlist={nlist} is more than the {n_entries} {what}; use at most "
                          f"{n_entries} (or leave it unset: {default_nlist(n_entries)} lists for this bank)")
    if params.nprobe > nlist:
        raise ConfigError(f"detector.params.knn.nprobe={params.nprobe} is more than the {nlist} IVF lists")
    return nlist


def build_ivf(faiss, bank: np.ndarray, dim: int, nlist: int, metric) -> tuple:
    """An untrained IndexIVFFlat of ``nlist`` lists in ``dim`` dims, and its quantizer (which it does not own)."""
    quantizer = (faiss.IndexFlatL2 if metric == faiss.METRIC_L2 else faiss.IndexFlatIP)(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
    index.cp.seed = 1234  # k-means seed (faiss's default, pinned: the lists must not vary)
    return index, quantizer


@register_index
class IVFIndex(FaissIndex):
    kind = "ivf"
    Params = IVFParams

    @classmethod
    def check_capacity(cls, params: IVFParams, n_entries: int) -> None:
        if params.nlist is not None and params.nlist > n_entries:
            raise ConfigError(f"detector.params.knn.nlist={params.nlist} is more than the {n_entries} training patches "
                              "the memory bank is drawn from")

    def fit(self, bank: np.ndarray) -> "IVFIndex":
        faiss = require("faiss", extra="faiss")
        self.bank_ = bank = self.prepare(bank)
        nlist = check_lists(self.params, len(bank), "memory entries")
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index_, self._quantizer = build_ivf(faiss, bank, bank.shape[1], nlist, metric)
        self.index_.train(bank)
        with faiss_threads(faiss, faiss.omp_get_max_threads()):
            self.index_.add(bank)
        self._configure()
        return self

    def _configure(self) -> None:
        self.index_.nprobe = self.params.nprobe

    def _expected(self, faiss):
        return faiss.IndexIVFFlat, None
