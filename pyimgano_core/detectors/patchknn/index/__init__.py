"""Nearest-neighbour search over a memory bank: a small registry of index kinds.

``knn: {kind: exact}`` (torch, the default), ``flat`` (faiss exact), ``hnsw``, ``ivf`` and
``pca_ivf`` (faiss, approximate: sub-linear in the bank). Each kind is its own module with its
parameter model; ``KNNParams`` is their discriminated union on ``kind`` (``exact`` when omitted).
"""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from .base import IndexParams, Metric, NNIndex, index_class, index_kinds, register_index
from .exact import ExactIndex
from .flat import FlatIndex
from .hnsw import HNSWIndex
from .ivf import IVFIndex, default_nlist
from .pca_ivf import PCAIVFIndex

_KINDS = (ExactIndex, FlatIndex, HNSWIndex, IVFIndex, PCAIVFIndex)


def _kind(value) -> str:
    return value.get("kind", "exact") if isinstance(value, dict) else getattr(value, "kind", "exact")


KNNParams = Annotated[Union[tuple(Annotated[c.Params, Tag(c.kind)] for c in _KINDS)], Discriminator(_kind)]


def make_index(params: IndexParams | dict, metric: Metric = "l2", device: str = "cpu", seed: int = 0) -> NNIndex:
    """An unfitted index of ``params.kind`` (a dict is validated first)."""
    if isinstance(params, dict):
        params = index_class(_kind(params)).Params.model_validate(params)
    return index_class(params.kind)(params, metric, device, seed)


__all__ = ["KNNParams", "NNIndex", "IndexParams", "Metric", "make_index", "register_index", "index_class",
           "index_kinds", "default_nlist"]
