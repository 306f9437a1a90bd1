"""Nearest-neighbour search over a memory bank: exact (torch / faiss flat) or approximate (faiss).

``KNNIndex(metric, backend, device, kind)``: ``kind="exact"`` scans the whole bank (torch
matrix products, or faiss ``IndexFlat*``); ``"hnsw"`` (Malkov & Yashunin 2018, faiss
``IndexHNSWFlat``) and ``"ivf"`` (inverted file over k-means lists, faiss ``IndexIVFFlat``) only
visit part of the bank, so search cost grows sub-linearly with its size. ``"pca_ivf"`` is a
two-stage search: an IVF index over the bank projected by PCA to ``pca_dim`` dimensions (faiss
``PCAMatrix`` + ``IndexIVFFlat`` in one ``IndexPreTransform``) proposes ``rerank_candidates``
entries per query, which are re-ranked by their exact full-dimensional distance to the query;
the coarse stage costs ~D / pca_dim times less than IVF-flat, and the index holds only the
projected bank (the full rows are the memory bank itself). An approximate neighbour
is a real bank entry, so its distance can only *over*-estimate the true nearest distance (never
under-estimate); the distances returned are still exact for the entry returned.

Distances: ``metric="l2"`` gives Euclidean distances; ``"cosine"`` gives 1 - cosine similarity
(rows are L2-normalised by the index). Approximate indexes are saved without pickle, as the
bytes of ``faiss.serialize_index`` (a uint8 array) plus their sha256, checked before faiss reads
them (a corrupt index is a :class:`ModelError`, never a crash inside faiss).
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError, ModelError
from ..optional import require

Metric = Literal["l2", "cosine"]
IndexKind = Literal["exact", "hnsw", "ivf", "pca_ivf"]
PCA_TRAIN_ROWS = 65536  # rows (seeded sample) the PCA of pca_ivf is estimated from: D x D covariance, plenty


def default_nlist(n_entries: int) -> int:
    """IVF lists when not set: 4 * sqrt(entries) (faiss guideline 4..16 sqrt(N)), at most N / 39.

    faiss's k-means wants >= 39 training points per centroid; with fewer it still works but
    warns, so small banks get fewer, fuller lists.
    """
    return int(max(1, min(round(4 * math.sqrt(n_entries)), n_entries // 39)))


class KNNIndex:
    """k-nearest-neighbour search over a memory bank [M, D] (float32).

    Parameters
    ----------
    metric : "l2" or "cosine"
    backend : "torch" or "faiss"
        Engine of the exact search (``kind="exact"``); approximate kinds always use faiss.
    device : "cpu" or "cuda"
        Device of the torch exact search.
    kind : "exact", "hnsw", "ivf" or "pca_ivf"
    hnsw_m, hnsw_ef_construction, hnsw_ef_search :
        HNSW graph degree, build-time and search-time candidate list sizes.
    ivf_nlist, ivf_nprobe :
        IVF k-means lists (None: :func:`default_nlist`) and lists visited per query (ivf, pca_ivf).
    pca_dim, rerank_candidates :
        pca_ivf: dimensions of the coarse search, and entries per query re-ranked exactly (>= k).
    """

    def __init__(self, metric: Metric = "l2", backend: Literal["torch", "faiss"] = "torch", device: str = "cpu",
                 kind: IndexKind = "exact", hnsw_m: int = 32, hnsw_ef_construction: int = 80, hnsw_ef_search: int = 64,
                 ivf_nlist: int | None = None, ivf_nprobe: int = 8, pca_dim: int = 64, rerank_candidates: int = 16,
                 seed: int = 0):
        self.metric, self.backend, self.device, self.kind = metric, backend, device, kind
        self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search = hnsw_m, hnsw_ef_construction, hnsw_ef_search
        self.ivf_nlist, self.ivf_nprobe = ivf_nlist, ivf_nprobe
        self.pca_dim, self.rerank_candidates, self.seed = pca_dim, rerank_candidates, seed

    # ------------------------------------------------------------------------------ build
    def _prepare(self, bank: np.ndarray) -> np.ndarray:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {bank.shape}")
        if self.metric == "cosine":
            bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
        return bank

    def fit(self, bank: np.ndarray) -> "KNNIndex":
        """Build the index over ``bank``; approximate kinds check their parameters against its size."""
        bank = self._prepare(bank)
        self._bank = bank  # kept for the exact fallback of the rare query an approximate index misses
        M, D = bank.shape
        if self.kind == "exact" and self.backend == "torch":
            self._torch_bank = torch.from_numpy(bank).to(self.device)
            self._torch_sq = (self._torch_bank * self._torch_bank).sum(1)
            return self
        faiss = require("faiss", extra="faiss")
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        threads = faiss.omp_get_max_threads()
        if self.kind == "exact":
            index = (faiss.IndexFlatL2 if self.metric == "l2" else faiss.IndexFlatIP)(D)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(D, self.hnsw_m, metric)
            index.hnsw.efConstruction = self.hnsw_ef_construction
            # One build thread: faiss's parallel HNSW insertion depends on thread timing, and a
            # seeded fit must give the same graph (a saved index keeps loads identical anyway).
            threads = 1
        else:
            nlist = default_nlist(M) if self.ivf_nlist is None else self.ivf_nlist
            if nlist > M:
                raise ConfigError(f"detector.params.ivf_nlist={nlist} is more than the {M} memory entries; "
                                  f"use at most {M} (or leave it unset: {default_nlist(M)} lists for this bank)")
            if self.ivf_nprobe > nlist:
                raise ConfigError(f"detector.params.ivf_nprobe={self.ivf_nprobe} is more than the {nlist} IVF lists")
            d = D
            if self.kind == "pca_ivf":
                if self.pca_dim > D:
                    raise ConfigError(f"detector.params.pca_dim={self.pca_dim} is more than the {D} feature dimensions")
                if self.rerank_candidates > M:
                    raise ConfigError(f"detector.params.rerank_candidates={self.rerank_candidates} is more than the {M} memory entries")
                d = self.pca_dim
                # the PCA centres the rows: only L2 survives that (for unit rows, L2 order = cosine order)
                metric = faiss.METRIC_L2
            self._quantizer = (faiss.IndexFlatL2 if metric == faiss.METRIC_L2 else faiss.IndexFlatIP)(d)  # IVF does not own it
            index = faiss.IndexIVFFlat(self._quantizer, d, nlist, metric)
            index.cp.seed = 1234  # k-means seed (faiss's default, pinned: the lists must not vary)
            if self.kind == "pca_ivf":
                # PCA of the (centred) bank, estimated on a seeded sample; the IVF lists live in its space.
                # Not whitened (eigen_power 0) and not rotated: distances there are the bank's own, projected.
                self._pca = faiss.PCAMatrix(D, d, 0.0, False)
                sample = bank
                if M > PCA_TRAIN_ROWS:
                    sample = bank[np.sort(np.random.default_rng(self.seed).choice(M, PCA_TRAIN_ROWS, replace=False))]
                self._pca.train(sample)
                self._ivf = index  # the python objects own the parts of the chain built here
                index = faiss.IndexPreTransform(self._pca, index)
            index.train(bank)
        with _faiss_threads(faiss, threads):
            index.add(bank)
        self._faiss = index
        self._configure()
        return self

    def _configure(self) -> None:
        if self.kind == "hnsw":
            self._faiss.hnsw.efSearch = self.hnsw_ef_search
        elif self.kind == "ivf":
            self._faiss.nprobe = self.ivf_nprobe
        elif self.kind == "pca_ivf":
            faiss = require("faiss", extra="faiss")
            ivf = faiss.extract_index_ivf(self._faiss)
            ivf.nprobe = self.ivf_nprobe
            # The projection and the coarse assignment run here as two small torch products (faiss's
            # own PCAMatrix.apply + quantizer took ~7 of its ~10 ms for one 784-patch image on 2
            # cores); faiss then only scans the chosen lists (search_preassigned).
            pca = faiss.downcast_VectorTransform(self._faiss.chain.at(0))
            a = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
            self._pca_At = torch.from_numpy(np.ascontiguousarray(a.T, dtype=np.float32))
            self._pca_b = torch.from_numpy(faiss.vector_to_array(pca.b).astype(np.float32))
            cent = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
            self._centroids_t = torch.from_numpy(np.ascontiguousarray(cent.T))
            self._centroids_sq = torch.from_numpy((cent * cent).sum(1))
            self._ivf_lists = ivf

    # ------------------------------------------------------------------------------ persistence
    def to_array(self) -> tuple[np.ndarray, str]:
        """The approximate index as uint8 bytes (``faiss.serialize_index``) and their sha256."""
        if self.kind == "exact":
            raise ValueError("an exact index is rebuilt from the memory bank; nothing to serialise")
        faiss = require("faiss", extra="faiss")
        raw = np.ascontiguousarray(faiss.serialize_index(self._faiss), dtype=np.uint8)
        return raw, hashlib.sha256(raw.tobytes()).hexdigest()

    def load_array(self, bank: np.ndarray, raw: np.ndarray, sha256: str) -> "KNNIndex":
        """Restore an approximate index saved by :meth:`to_array` over the same ``bank``.

        Raises :class:`ModelError` when the bytes are not the ones saved (checksum), when faiss
        cannot read them, or when the index does not match the bank or this index's kind.
        """
        raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
        if hashlib.sha256(raw.tobytes()).hexdigest() != sha256:
            raise ModelError(f"saved {self.kind} index (arrays.npz: knn_index_) is corrupt: sha256 mismatch")
        faiss = require("faiss", extra="faiss")
        try:
            index = faiss.deserialize_index(raw)
        except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
            raise ModelError(f"saved {self.kind} index cannot be read by faiss: {str(exc).splitlines()[0]}") from None
        bank = self._prepare(bank)
        want = {"hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat, "pca_ivf": faiss.IndexPreTransform}[self.kind]
        ok = isinstance(index, want) and index.ntotal == len(bank) and index.d == bank.shape[1]
        if ok and self.kind == "pca_ivf":  # PCA to pca_dim, then IVF-flat lists in that space
            inner = faiss.downcast_index(index.index)
            ok = (index.chain.size() == 1 and isinstance(inner, faiss.IndexIVFFlat) and inner.d == self.pca_dim
                  and isinstance(faiss.downcast_VectorTransform(index.chain.at(0)), faiss.PCAMatrix))
        if not ok:
            raise ModelError(f"saved index is a {type(index).__name__} of {index.ntotal}x{index.d}, expected a "
                             f"{want.__name__} over the {len(bank)}x{bank.shape[1]} memory bank")
        self._bank, self._faiss = bank, index
        self._configure()
        return self

    # ------------------------------------------------------------------------------ search
    def search(self, queries: np.ndarray | torch.Tensor, k: int = 1, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances [Q, k] (float32, ascending) and bank indices [Q, k] (int64) of the nearest entries."""
        if hasattr(self, "_torch_bank"):
            return self._search_torch(queries, k, chunk)
        q = np.ascontiguousarray(torch.as_tensor(queries, dtype=torch.float32).cpu().numpy())
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = min(k, len(self._bank))
        if self.kind == "pca_ivf":
            return self._search_rerank(q, k)
        sims, idx = self._faiss.search(q, k)
        missed = np.flatnonzero((idx < 0).any(axis=1))
        if missed.size:  # fewer than k entries in the visited lists/graph: search those rows exactly
            sims[missed], idx[missed] = _exact_numpy(self._bank, q[missed], k, self.metric)
        d = np.sqrt(np.maximum(sims, 0)) if self.metric == "l2" else 1.0 - sims
        return d.astype(np.float32), idx.astype(np.int64)

    def _search_rerank(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """pca_ivf: candidates from the projected IVF, ordered by their exact full-dimensional distance."""
        faiss = require("faiss", extra="faiss")
        r = max(k, self.rerank_candidates)
        qt = torch.from_numpy(q)
        qp = torch.addmm(self._pca_b, qt, self._pca_At)  # x A^T + b: faiss PCAMatrix.apply
        coarse = torch.addmm(self._centroids_sq, qp, self._centroids_t, alpha=-2)  # |c|^2 - 2 x.c (+|x|^2: same order)
        nprobe = min(self.ivf_nprobe, coarse.shape[1])
        cd, assign = torch.topk(coarse, nprobe, dim=1, largest=False, sorted=True)
        cd += (qp * qp).sum(1, keepdim=True)
        _, cand = self._ivf_lists.search_preassigned(np.ascontiguousarray(qp.numpy()), r, assign.numpy(),
                                                     np.ascontiguousarray(cd.numpy()))
        # Exact distances to the candidates in faiss's by-index kernels: each candidate row is read once,
        # differences taken directly (exact to float rounding for the entry returned), OpenMP over the
        # queries; 1.9 ms for 784 x 16 rows of 1024-d on 2 cores, against 8.2 ms for a torch gather + sub.
        d = np.empty(cand.shape, dtype=np.float32)
        safe = np.maximum(cand, 0)  # -1: the visited lists held fewer than r entries (masked below)
        kernel = faiss.fvec_L2sqr_by_idx if self.metric == "l2" else faiss.fvec_inner_products_by_idx
        kernel(faiss.swig_ptr(d), faiss.swig_ptr(q), faiss.swig_ptr(self._bank), faiss.swig_ptr(safe), q.shape[1], len(q), r)
        if self.metric == "cosine":
            d = 1.0 - d
        d[cand < 0] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)
        if self.metric == "l2":
            d = np.sqrt(d)
        missed = np.flatnonzero(~np.isfinite(d).all(axis=1))
        if missed.size:  # fewer than k candidates: those rows exactly
            sims, idx[missed] = _exact_numpy(self._bank, q[missed], k, self.metric)
            d[missed] = np.sqrt(np.maximum(sims, 0)) if self.metric == "l2" else 1.0 - sims
        return d.astype(np.float32), idx.astype(np.int64)

    def _search_torch(self, queries, k: int, chunk: int | None):
        q = torch.as_tensor(queries, dtype=torch.float32)
        bank, bank_sq = self._torch_bank, self._torch_sq
        if chunk is None:  # queries per block: the (chunk, M) similarity matrix stays under ~256 MB
            chunk = max(1, min(4096, (1 << 26) // max(len(bank), 1)))
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        dists, inds = [], []
        for s in range(0, len(q), chunk):
            qc = q[s : s + chunk].to(self.device)
            sim = qc @ bank.T  # (chunk, M)
            if self.metric == "l2":
                # |q - m|^2 = |q|^2 - 2 q.m + |m|^2; clamp rounding negatives before the sqrt
                score = sim.mul_(-2).add_(bank_sq).add_((qc * qc).sum(1, keepdim=True))
                v, i = torch.topk(score, k, dim=1, largest=False)
                v = v.clamp_(min=0).sqrt_()
            else:
                v, i = torch.topk(sim, k, dim=1, largest=True)
                v = 1.0 - v
            dists.append(v.cpu())
            inds.append(i.cpu())
        return torch.cat(dists).numpy(), torch.cat(inds).numpy()


def _exact_numpy(bank: np.ndarray, q: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Exact search in faiss's conventions (squared L2 or inner product), for a few rows."""
    sim = q @ bank.T
    score = (q * q).sum(1, keepdims=True) - 2 * sim + (bank * bank).sum(1) if metric == "l2" else -sim
    idx = np.argsort(score, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(score, idx, axis=1)
    return (val if metric == "l2" else -val), idx


@contextmanager
def _faiss_threads(faiss, n: int):
    """Run a block with ``n`` faiss OpenMP threads."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)
