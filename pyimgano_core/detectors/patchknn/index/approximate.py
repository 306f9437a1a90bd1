"""What the faiss-backed approximate kinds share: saving without pickle, and the exact fallback.

An approximate index is saved as the bytes of ``faiss.serialize_index`` (a uint8 array,
``arrays.npz: knn_index_``) plus their sha256 (``knn_index_sha256``), checked before faiss
reads them: a corrupt index is a :class:`ModelError`, never a crash inside faiss.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ....errors import ModelError
from ....optional import require
from .base import NNIndex, exact_numpy, to_distances


class FaissIndex(NNIndex):
    """Base of hnsw / ivf / pca_ivf: ``index_`` is the faiss index over the prepared bank ``bank_``."""

    def _expected(self, faiss) -> tuple[type, str | None]:  # pragma: no cover - abstract
        """The faiss class a saved index must be, and a reason it does not fit (None: it fits)."""
        raise NotImplementedError

    def _configure(self) -> None:
        """Set the search-time parameters on ``index_`` (after fit or load)."""

    def search(self, queries, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = self.queries(queries)
        k = min(k, len(self.bank_))
        sims, idx = self.index_.search(q, k)
        missed = np.flatnonzero((idx < 0).any(axis=1))
        if missed.size:  # fewer than k entries in the visited lists/graph: search those rows exactly
            sims[missed], idx[missed] = exact_numpy(self.bank_, q[missed], k, self.metric)
        return to_distances(sims, self.metric), idx.astype(np.int64)

    def save(self) -> tuple[dict[str, np.ndarray], dict]:
        faiss = require("faiss", extra="faiss")
        raw = np.ascontiguousarray(faiss.serialize_index(self.index_), dtype=np.uint8)
        return {"knn_index_": raw}, {"knn_index_sha256": hashlib.sha256(raw.tobytes()).hexdigest()}

    def load(self, bank: np.ndarray, arrays: dict, extras: dict) -> "FaissIndex":
        """Restore the saved index over the same ``bank``; checksum, faiss's reading and the shape are checked."""
        if "knn_index_" not in arrays or "knn_index_sha256" not in extras:
            raise ModelError(f"model has knn.kind: {self.kind} but no saved index (arrays.npz: knn_index_)")
        raw = np.ascontiguousarray(arrays["knn_index_"], dtype=np.uint8).ravel()
        if hashlib.sha256(raw.tobytes()).hexdigest() != extras["knn_index_sha256"]:
            raise ModelError(f"saved {self.kind} index (arrays.npz: knn_index_) is corrupt: sha256 mismatch")
        faiss = require("faiss", extra="faiss")
        try:
            index = faiss.deserialize_index(raw)
        except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
            raise ModelError(f"saved {self.kind} index cannot be read by faiss: {str(exc).splitlines()[0]}") from None
        bank = self.prepare(bank)
        self.index_ = index
        want, why = self._expected(faiss)
        ok = isinstance(index, want) and index.ntotal == len(bank) and index.d == bank.shape[1] and why is None
        if not ok:
            raise ModelError(f"saved index is a {type(index).__name__} of {index.ntotal}x{index.d}, expected a "
                             f"{want.__name__} over the {len(bank)}x{bank.shape[1]} memory bank")
        self.bank_ = bank
        self._configure()
        return self
