"""``knn: {kind: pca_ivf}``: IVF candidates in a PCA space, re-ranked by their exact distance.

An IVF index over the bank projected by PCA to ``pca_dim`` dimensions (faiss ``PCAMatrix`` +
``IndexIVFFlat`` in one ``IndexPreTransform``) proposes ``rerank_candidates`` entries per query,
which are re-ranked by their exact full-dimensional distance. The coarse stage costs ~D / pca_dim
times less than IVF-flat, and the index holds only the projected bank (the full rows are the
memory bank itself). Measured recall and latency: ``reports/latency.md``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ....errors import ConfigError
from ....optional import require
from .approximate import FaissIndex
from .base import IndexParams, exact_numpy, faiss_threads, register_index
from .ivf import IVFIndex, build_ivf, check_lists

PCA_TRAIN_ROWS = 65536  # rows (seeded sample) the PCA is estimated from: D x D covariance, plenty


class PCAIVFParams(IndexParams):
    kind: Literal["pca_ivf"] = "pca_ivf"
    nlist: int | None = Field(None, ge=1, description="k-means lists (None: 4*sqrt(entries)); at most the entries")
    nprobe: int = Field(8, ge=1, description="lists visited per query (recall vs time); at most nlist")
    pca_dim: int = Field(64, ge=1, description="dimensions of the coarse (candidate) search; at most the feature dimension")
    rerank_candidates: int = Field(16, ge=1, le=4096, description="candidates per patch re-ranked by their exact "
                                   "full-dimensional distance (recall vs time)")

    @model_validator(mode="after")
    def _nprobe_within_nlist(self):
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} visits more lists than nlist={self.nlist}")
        return self


@register_index
class PCAIVFIndex(FaissIndex):
    kind = "pca_ivf"
    Params = PCAIVFParams
    check_capacity = IVFIndex.check_capacity

    def fit(self, bank: np.ndarray) -> "PCAIVFIndex":
        faiss = require("faiss", extra="faiss")
        self.bank_ = bank = self.prepare(bank)
        M, D = bank.shape
        p = self.params
        nlist = check_lists(p, M, "memory entries")
        if p.pca_dim > D:
            raise ConfigError(f"detector.params.knn.pca_dim={p.pca_dim} is more than the {D} feature dimensions")
        if p.rerank_candidates > M:
            raise ConfigError(f"detector.params.knn.rerank_candidates={p.rerank_candidates} is more than the {M} memory entries")
        # the PCA centres the rows: only L2 survives that (for unit rows, L2 order = cosine order)
        ivf, self._quantizer = build_ivf(faiss, bank, p.pca_dim, nlist, faiss.METRIC_L2)
        # PCA of the (centred) bank, estimated on a seeded sample; the IVF lists live in its space.
        # Not whitened (eigen_power 0) and not rotated: distances there are the bank's own, projected.
        self._pca = faiss.PCAMatrix(D, p.pca_dim, 0.0, False)
        sample = bank
        if M > PCA_TRAIN_ROWS:
            sample = bank[np.sort(np.random.default_rng(self.seed).choice(M, PCA_TRAIN_ROWS, replace=False))]
        self._pca.train(sample)
        self._ivf = ivf  # the python objects own the parts of the chain built here
        self.index_ = faiss.IndexPreTransform(self._pca, ivf)
        self.index_.train(bank)
        with faiss_threads(faiss, faiss.omp_get_max_threads()):
            self.index_.add(bank)
        self._configure()
        return self

    def _expected(self, faiss):
        index = self.index_
        if not isinstance(index, faiss.IndexPreTransform):
            return faiss.IndexPreTransform, "not a pre-transform"
        inner = faiss.downcast_index(index.index)
        ok = (index.chain.size() == 1 and isinstance(inner, faiss.IndexIVFFlat) and inner.d == self.params.pca_dim
              and isinstance(faiss.downcast_VectorTransform(index.chain.at(0)), faiss.PCAMatrix))
        return faiss.IndexPreTransform, None if ok else "another chain"

    def _configure(self) -> None:
        faiss = require("faiss", extra="faiss")
        ivf = faiss.extract_index_ivf(self.index_)
        ivf.nprobe = self.params.nprobe
        # The projection and the coarse assignment run as two small torch products (faiss's own
        # PCAMatrix.apply + quantizer cost most of the search); faiss then only scans the chosen
        # lists (search_preassigned).
        pca = faiss.downcast_VectorTransform(self.index_.chain.at(0))
        a = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
        self._pca_At = torch.from_numpy(np.ascontiguousarray(a.T, dtype=np.float32))
        self._pca_b = torch.from_numpy(faiss.vector_to_array(pca.b).astype(np.float32))
        cent = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
        self._centroids_t = torch.from_numpy(np.ascontiguousarray(cent.T))
        self._centroids_sq = torch.from_numpy((cent * cent).sum(1))
        self._ivf_lists = ivf

    def search(self, queries, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the projected IVF, ordered by their exact full-dimensional distance."""
        faiss = require("faiss", extra="faiss")
        q = self.queries(queries)
        k = min(k, len(self.bank_))
        r = max(k, self.params.rerank_candidates)
        qt = torch.from_numpy(q)
        qp = torch.addmm(self._pca_b, qt, self._pca_At)  # x A^T + b: faiss PCAMatrix.apply
        coarse = torch.addmm(self._centroids_sq, qp, self._centroids_t, alpha=-2)  # |c|^2 - 2 x.c (+|x|^2: same order)
        nprobe = min(self.params.nprobe, coarse.shape[1])
        cd, assign = torch.topk(coarse, nprobe, dim=1, largest=False, sorted=True)
        cd += (qp * qp).sum(1, keepdim=True)
        _, cand = self._ivf_lists.search_preassigned(np.ascontiguousarray(qp.numpy()), r, assign.numpy(),
                                                     np.ascontiguousarray(cd.numpy()))
        # Exact distances to the candidates in faiss's by-index kernels: each candidate row is read
        # once, differences taken directly (exact to float rounding), OpenMP over the queries.
        d = np.empty(cand.shape, dtype=np.float32)
        safe = np.maximum(cand, 0)  # -1: the visited lists held fewer than r entries (masked below)
        kernel = faiss.fvec_L2sqr_by_idx if self.metric == "l2" else faiss.fvec_inner_products_by_idx
        kernel(faiss.swig_ptr(d), faiss.swig_ptr(q), faiss.swig_ptr(self.bank_), faiss.swig_ptr(safe), q.shape[1], len(q), r)
        if self.metric == "cosine":
            d = 1.0 - d
        d[cand < 0] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)
        if self.metric == "l2":
            d = np.sqrt(d)
        missed = np.flatnonzero(~np.isfinite(d).all(axis=1))
        if missed.size:  # fewer than k candidates: those rows exactly
            sims, idx[missed] = exact_numpy(self.bank_, q[missed], k, self.metric)
            d[missed] = np.sqrt(np.maximum(sims, 0)) if self.metric == "l2" else 1.0 - sims
        return d.astype(np.float32), idx.astype(np.int64)
