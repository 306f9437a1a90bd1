"""The memory bank's subsampling: ``coreset: {method, ratio, ...}`` and ``Coreset.run(features) -> indices``.

Three methods, one parameter model each (a discriminated union on ``method``, ``exact`` when
omitted), so an option of one method given to another fails validation by its type:

* ``exact``: greedy k-center on a seeded random projection, the picks of the plain greedy
  (PatchCore, Roth et al. 2022, Alg. 1; the algorithm is in :mod:`.greedy`);
* ``chunked``: the exact greedy per interleaved chunk of ``chunk_points`` patches at twice its
  share, then over their union (approximate, linear cost for very large training sets);
* ``random``: a seeded uniform subset (AnomalyDINO's cheap alternative).

``ratio: 1`` keeps every patch (no search runs).
"""
from __future__ import annotations

from typing import Annotated, Callable, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .greedy import greedy_coreset

ProgressFn = Callable[[int, int], None]  # (picks done, picks total)
_FIXED_WORKSPACE = 200 << 20  # greedy: blocks of the screening product and float64 pair rows (greedy._BLOCK, _PAIRS)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExactCoreset(_Part):
    """Greedy k-center, exact picks."""

    method: Literal["exact"] = "exact"
    ratio: float = Field(0.1, gt=0, le=1, description="share of training patches kept in memory (1 = all)")
    projection_dim: int = Field(128, ge=1, description="random projection the greedy search runs on")


class ChunkedCoreset(ExactCoreset):
    """Greedy k-center per interleaved chunk at twice its share, then over the union (approximate)."""

    method: Literal["chunked"] = "chunked"  # type: ignore[assignment]
    chunk_points: int = Field(200_000, ge=1000, description="patches per chunk")


class RandomCoreset(_Part):
    """A seeded uniform subset."""

    method: Literal["random"] = "random"
    ratio: float = Field(0.1, gt=0, le=1, description="share of training patches kept in memory (1 = all)")


def _method(value) -> str:
    if isinstance(value, dict):
        return value.get("method", "exact")
    return getattr(value, "method", "exact")


CoresetParams = Annotated[
    Union[Annotated[ExactCoreset, Tag("exact")], Annotated[ChunkedCoreset, Tag("chunked")],
          Annotated[RandomCoreset, Tag("random")]],
    Discriminator(_method),
]
METHODS = ("exact", "chunked", "random")


class Coreset:
    """Runs one ``coreset`` parameter set: ``run(features, rows=None) -> sorted indices``."""

    def __init__(self, params: ExactCoreset | ChunkedCoreset | RandomCoreset, seed: int = 0):
        self.params, self.seed = params, seed

    def size(self, n_rows: int) -> int:
        """Entries kept from ``n_rows`` candidate rows (at least one)."""
        return int(min(max(int(n_rows * self.params.ratio), 1), n_rows))

    def run(self, features, n_total: int | None = None, rows: np.ndarray | None = None,
            progress: ProgressFn | None = None, stats: dict | None = None) -> np.ndarray:
        """Indices (ascending) of the kept rows of ``features`` [N, D] (may be disk-backed).

        ``rows``: the candidate rows (SoftPatch: the patches its noise filter kept); the returned
        indices are then positions in ``rows``. ``n_total``: the row count ``ratio`` applies to
        (default: the candidates); SoftPatch sizes its coreset on *all* training patches, as the
        reference code does.
        """
        p = self.params
        n_cand = len(features) if rows is None else len(rows)
        n = self.size(n_cand if n_total is None else n_total)
        if p.ratio >= 1:
            return np.arange(n_cand)
        if p.method == "random":
            return np.sort(np.random.default_rng(self.seed).choice(n_cand, size=min(n, n_cand), replace=False))
        method = "chunked" if p.method == "chunked" else "exact"
        chunk = p.chunk_points if p.method == "chunked" else 200_000
        return np.sort(greedy_coreset(features, n, p.projection_dim, self.seed, method=method, chunk_points=chunk,
                                      rows=rows, progress=progress, stats=stats))

    def memory_needs(self, n_patches: int, dim: int) -> dict[str, int]:
        """Bytes of the fit's large arrays: the memory bank, and the greedy search's state.

        The search keeps its float32 projection plus 12 bytes of state per candidate patch,
        ~200 MB of fixed work space, and for ``chunked`` one chunk plus the union of the picks.
        """
        p = self.params
        picks = int(n_patches * p.ratio)
        needs = {"memory_bank": picks * dim * 4}
        if p.ratio < 1 and p.method != "random":
            proj = min(p.projection_dim, dim)
            chunked = p.method == "chunked"
            pts = min(n_patches, p.chunk_points) if chunked else n_patches
            union = 2 * picks * proj * 4 if chunked else 0
            needs["coreset_search"] = pts * (proj * 4 + 12) + union + _FIXED_WORKSPACE
        return needs

    def describe(self, n_rows: int) -> str:
        """Progress label."""
        return f"coreset: {self.size(n_rows):,} of {n_rows:,} patches"
