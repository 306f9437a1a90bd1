"""The nearest-neighbour index protocol, its registry, and what every kind shares.

An index kind is one class with a ``kind`` name, a parameter model ``Params`` (its fields are
the ``knn: {kind: ..., ...}`` section of a patch-kNN detector) and four verbs: ``fit(bank)``,
``search(queries, k)``, ``save() -> (arrays, extras)`` and ``load(bank, arrays, extras)``.
Distances: ``metric="l2"`` gives Euclidean distances; ``"cosine"`` gives 1 - cosine similarity
(rows are L2-normalised by the index). An approximate neighbour is a real bank entry, so its
distance can only over-estimate the true nearest distance, and is exact for the entry returned.
Adding a kind = its own module + ``@register_index`` + an import line in ``index/__init__.py``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

Metric = Literal["l2", "cosine"]


class IndexParams(BaseModel):
    """Base of each kind's ``knn`` parameters (strict: an option of another kind is an unknown key)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NNIndex:
    """k-nearest-neighbour search over a memory bank [M, D] (float32)."""

    kind: ClassVar[str]
    Params: ClassVar[type[IndexParams]]
    exact: ClassVar[bool] = False  # returns the true nearest entries (what the ONNX graph's matmul computes)
    needs_faiss: ClassVar[bool] = True

    def __init__(self, params: IndexParams | None = None, metric: Metric = "l2", device: str = "cpu", seed: int = 0):
        self.params = params if params is not None else self.Params()
        self.metric, self.device, self.seed = metric, device, seed

    @classmethod
    def check_capacity(cls, params: IndexParams, n_entries: int) -> None:
        """Raise a ConfigError before the memory bank is built when ``n_entries`` cannot hold this index."""

    def fit(self, bank: np.ndarray) -> "NNIndex":  # pragma: no cover - abstract
        raise NotImplementedError

    def search(self, queries, k: int = 1) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Distances [Q, k] (float32, ascending) and bank indices [Q, k] (int64) of the nearest entries."""
        raise NotImplementedError

    def save(self) -> tuple[dict[str, np.ndarray], dict]:
        """What a model folder keeps besides the memory bank (nothing: rebuilt from the bank)."""
        return {}, {}

    def load(self, bank: np.ndarray, arrays: dict, extras: dict) -> "NNIndex":
        """Restore over the saved memory bank (default: build again from it)."""
        return self.fit(bank)

    # -- shared helpers --------------------------------------------------------------------
    def prepare(self, bank: np.ndarray) -> np.ndarray:
        """float32 C-contiguous bank, L2-normalised rows for the cosine metric."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] array, got shape {bank.shape}")
        if self.metric == "cosine":
            bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
        return bank

    def queries(self, queries) -> np.ndarray:
        """Queries as float32 numpy rows, normalised for the cosine metric."""
        q = np.ascontiguousarray(np.asarray(queries.numpy() if hasattr(queries, "numpy") else queries, dtype=np.float32))
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q


_REGISTRY: dict[str, type[NNIndex]] = {}


def register_index(cls: type[NNIndex]) -> type[NNIndex]:
    """Class decorator: make an index kind available by its ``kind`` name."""
    if not getattr(cls, "kind", "") or cls.kind in _REGISTRY:
        raise ValueError(f"index kind {getattr(cls, 'kind', '')!r} is empty or already registered")
    _REGISTRY[cls.kind] = cls
    return cls


def index_class(kind: str) -> type[NNIndex]:
    return _REGISTRY[kind]


def index_kinds() -> list[str]:
    return list(_REGISTRY)


def exact_numpy(bank: np.ndarray, q: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Exact search in faiss's conventions (squared L2 or inner product), for a few rows."""
    sim = q @ bank.T
    score = (q * q).sum(1, keepdims=True) - 2 * sim + (bank * bank).sum(1) if metric == "l2" else -sim
    idx = np.argsort(score, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(score, idx, axis=1)
    return (val if metric == "l2" else -val), idx


def to_distances(sims: np.ndarray, metric: Metric) -> np.ndarray:
    """faiss outputs (squared L2 or inner products) -> distances (Euclidean or 1 - cosine)."""
    return (np.sqrt(np.maximum(sims, 0)) if metric == "l2" else 1.0 - sims).astype(np.float32)


@contextmanager
def faiss_threads(faiss, n: int):
    """Run a block with ``n`` faiss OpenMP threads."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)
