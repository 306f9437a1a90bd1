"""Greedy k-center coreset (PatchCore, Roth et al. 2022, Alg. 1): exact, at matrix-multiply speed.

The greedy picks a first point with the seed, then repeatedly the point farthest from all
picks so far. Done plainly, every pick rescans every point: a memory-bound pass per pick, cost
points x picks. Here the picks are exactly those of the plain loop (same float64 distances,
ties to the lowest index as ``numpy.argmax``), found lazily (the idea of Minoux's 1978 lazy
greedy): a point's stored distance can only fall as picks are added, so it is an upper bound.

* A pool of the ``_POOL`` points with the largest stored distances is kept current pick by
  pick. When the pool's best current distance exceeds every stored distance outside it, that
  point is the plain loop's next pick.
* Otherwise, or after ``_BATCH`` picks, the pending picks are applied to all points at once:
  one float32 matrix product [rows x picks] screens every pair with a rigorous rounding bound,
  and only the pairs that may lower a distance get the float64 distance that decides.

Distances are float64 ``sum((x - c)**2)`` over the float32 random projection: the same value
for a row whichever subset it is computed in, so the batched run and a plain loop see identical
numbers; float32 forms are used only as filters.

``method="chunked"`` approximates for very large training sets (two levels, as composable
k-center coresets, Indyk et al. 2014): the points are dealt to chunks of at most ``chunk_points``
in interleaved blocks of rows (chunk c holds blocks c, c + chunks, ...), so every chunk spans the
whole training set even when files come in acquisition runs; each chunk gets its exact greedy
coreset with twice its share of the picks, and the exact greedy over the union of those picks
chooses the final ``n``. Cost grows linearly with the number of chunks. Measured speed and
accuracy against the exact greedy: ``reports/coreset_speed.md``, ``reports/scale.md``.
"""
from __future__ import annotations

import time
from typing import Callable, Literal

import numpy as np

CoresetMethod = Literal["exact", "chunked"]
ProgressFn = Callable[[int, int], None]  # (picks done, picks total)

_MARGIN = 1e-6  # relative slack on every bound test (float64 rounding is ~1e-14 here)
_ROWS = 1 << 14  # rows per read of full-dimension features (bounded memory for disk-backed inputs)
_BATCH = 512  # pending picks applied to all points in one matrix product
_POOL = 4096  # points with the largest stored distances kept current pick by pick
_BLOCK = 8192  # rows per block of that product: [8192 x 512] float32 is 16 MB
_OVERPICK = 2  # chunked: each chunk's greedy picks this many times its share of the coreset
_INTERLEAVE = 4096  # chunked: rows per block dealt round-robin to the chunks
_PAIRS = 1 << 16  # (row, pick) pairs per float64 distance step: 128 MB at 128-d


def projection_matrix(dim_in: int, dim: int, rng: np.random.Generator) -> np.ndarray | None:
    """Gaussian random projection [dim_in, dim] (Johnson-Lindenstrauss, as the paper), or None."""
    if not dim or dim >= dim_in:
        return None
    return (rng.standard_normal((dim_in, dim)) / np.sqrt(dim)).astype(np.float32)


def project_rows(features, rows: np.ndarray | None, proj: np.ndarray | None) -> np.ndarray:
    """float32 projection of ``features[rows]`` (all rows if None), read in chunks of rows.

    ``features`` may be a disk-backed array: only one chunk of full-dimension rows is in memory.
    """
    n = len(features) if rows is None else len(rows)
    dim = features.shape[1] if proj is None else proj.shape[1]
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, _ROWS):
        sl = slice(s, min(n, s + _ROWS))
        block = np.asarray(features[sl] if rows is None else features[rows[sl]], dtype=np.float32)
        out[sl] = block if proj is None else block @ proj
    return out


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances float64 [m] of rows ``x`` [m, d] (float32) to ``c`` [d] or [m, d] (float64)."""
    diff = x.astype(np.float64)
    diff -= c
    return np.einsum("ij,ij->i", diff, diff)


def _rounding_slack(d: int) -> float:
    """Relative bound on the float32 screen ``|x|^2 - 2 fl(x.c) + |c|^2`` against the exact value.

    The screen's product has d + 1 terms (the ``|c|^2`` column included) and errs by at most
    gamma_{d+1} (Higham) times ``|x|^2 + 2 |c|^2``; the squared norms by gamma_d times theirs; a
    few float32 roundings around them add a few eps. This is about 1.5x that sum.
    """
    return (6.0 * d + 24.0) * float(np.finfo(np.float32).eps)


class _Batched:
    """Exact greedy k-center over rows ``x`` (float32 [N, d]): stored distances and the pool."""

    def __init__(self, x: np.ndarray):
        N, d = x.shape
        # rows carry a trailing 1, so one product gives -2 x.c + |c|^2 (1 - err) (see apply)
        self.xa = np.empty((N, d + 1), np.float32)
        self.xa[:, :d] = x
        self.xa[:, d] = 1.0
        self.x = self.xa[:, :d]
        self.sq = np.einsum("ij,ij->i", self.x, self.x)
        self.err = _rounding_slack(d)
        self.min_d = np.full(N, np.inf)  # float64, exact for the picks applied so far
        self.exact_pairs = 0
        self.batches = 0

    def apply(self, centers: np.ndarray) -> None:
        """Lower every stored distance by the picks ``centers`` (row indices), exactly."""
        self.batches += 1
        x, sq, err = self.x, self.sq, self.err
        c = x[centers]
        ca = np.empty((x.shape[1] + 1, len(centers)), np.float32)
        ca[:-1] = -2.0 * c.T
        ca[-1] = sq[centers] * (1.0 - err)
        band = float(2.0 * err * sq[centers].max())
        for s in range(0, len(x), _BLOCK):
            e = min(len(x), s + _BLOCK)
            # float32 screen h = -2 x.c + |c|^2 (1 - err): a pair's float64 distance lies within
            # h + |x|^2 (1 - err) (lower) and h + |x|^2 (1 + err) + band (upper). A pair whose lower
            # bound is not below the stored distance cannot lower it.
            h = self.xa[s:e] @ ca
            xs = sq[s:e].astype(np.float64)
            t = (self.min_d[s:e] * (1.0 + _MARGIN) - xs * (1.0 - err)).astype(np.float32)
            r, k = np.nonzero(h < t[:, None])
            if len(r) > 2 * (e - s):  # many pairs (a first or far batch): only those that can be a row's new minimum
                best = (h.min(1) + xs * (1.0 + err) + band) * (1.0 + _MARGIN) - xs * (1.0 - err)
                r, k = np.nonzero(h < np.minimum(t, best.astype(np.float32))[:, None])
            self.exact_pairs += len(r)
            for q in range(0, len(r), _PAIRS):  # bounded memory however many pairs pass
                rq, kq = s + r[q : q + _PAIRS], k[q : q + _PAIRS]
                np.minimum.at(self.min_d, rq, _sqdist(x[rq], c[kq].astype(np.float64)))

    def pool(self) -> tuple[np.ndarray, float]:
        """Row indices (ascending) of the ``_POOL`` largest stored distances, and the largest outside."""
        N = len(self.x)
        if N <= _POOL:
            return np.arange(N), -np.inf
        part = np.argpartition(-self.min_d, _POOL)
        return np.sort(part[:_POOL]), float(self.min_d[part[_POOL]])


def kcenter(x: np.ndarray, n: int, first: int, progress: ProgressFn | None = None) -> tuple[np.ndarray, dict]:
    """Exact greedy k-center: ``n`` row indices of ``x`` starting at row ``first``.

    Returns (picks, stats) with stats ``exact_fraction``, ``batches`` and ``seconds``.
    """
    t0 = time.perf_counter()
    N = len(x)
    n = int(min(max(n, 1), N))
    g = _Batched(np.ascontiguousarray(x, dtype=np.float32))
    x, sq, err = g.x, g.sq, g.err
    picks = np.empty(n, np.int64)
    picks[0] = int(first)
    applied, stale = 0, True  # picks[:applied] are in g.min_d; stale: the pool must be rebuilt
    every = max(1, n // 200)
    for i in range(1, n):
        if not stale:
            j = int(np.argmax(cur))  # pool rows ascend: ties go to the lowest index
            stale = i - applied >= _BATCH or not cur[j] > outside
        if stale:
            g.apply(picks[applied:i])
            applied = i
            idx = int(np.argmax(g.min_d))
            rows, outside = g.pool()
            xp, sqp, cur = x[rows], sq[rows], g.min_d[rows]  # cur: exact current distances of the pool
            stale = False
        else:
            idx = int(rows[j])
        picks[i] = idx
        c = x[idx]
        d32 = sqp - 2.0 * (xp @ c) + sq[idx]
        may = np.flatnonzero(d32 - err * (sqp + sq[idx]) < cur * (1.0 + _MARGIN))
        g.exact_pairs += len(may)
        np.minimum.at(cur, may, _sqdist(xp[may], c.astype(np.float64)))
        if progress is not None and (i + 1) % every == 0:
            progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    stats = {"exact_fraction": g.exact_pairs / max(N * max(n - 1, 1), 1), "batches": g.batches,
             "seconds": time.perf_counter() - t0}
    return picks, stats


def greedy_coreset(features, n: int, proj_dim: int = 128, seed: int = 0, method: CoresetMethod = "exact",
                   chunk_points: int = 200_000, rows: np.ndarray | None = None,
                   progress: ProgressFn | None = None, stats: dict | None = None) -> np.ndarray:
    """Indices of ``n`` patches picked by greedy k-center on a random projection to ``proj_dim``.

    ``features`` [N, D] may be disk-backed; ``rows`` restricts the candidates to those rows
    (returned indices are then positions in ``rows``). The projection matrix and the first
    pick come from ``seed`` (the reference code uses a random linear layer). ``method="exact"``
    is the plain greedy's picks; ``"chunked"`` see the module docstring. ``stats`` (a dict)
    receives ``exact_fraction``, ``coreset_method`` and the number of chunks.
    """
    N = len(features) if rows is None else len(rows)
    n = int(min(max(n, 1), N))
    rng = np.random.default_rng(seed)
    proj = projection_matrix(features.shape[1], proj_dim, rng)
    first = int(rng.integers(N))
    if method == "exact" or N <= chunk_points:
        picks, st = kcenter(project_rows(features, rows, proj), n, first, progress)
        chunks = 1
    elif method == "chunked":
        chunks = -(-N // chunk_points)
        # chunk c holds the row blocks c, c + chunks, c + 2 chunks, ... (module docstring); whole
        # blocks keep the reads of a disk-backed store contiguous
        block = np.arange(N) // max(1, min(_INTERLEAVE, N // (8 * chunks)))  # >= 8 blocks per chunk
        members = [np.flatnonzero(block % chunks == c) for c in range(chunks)]
        sizes = np.array([len(m) for m in members])
        share = np.minimum(np.ceil(_OVERPICK * n * sizes / N).astype(np.int64), sizes)
        union, zs, done, batches = [], [], 0, 0
        total = int(share.sum()) + n
        for m, q in zip(members, share):
            sub = m if rows is None else rows[m]
            report = None if progress is None else (lambda i, _t, d=done: progress(d + i, total))
            z = project_rows(features, sub, proj)
            p, st = kcenter(z, int(q), int(rng.integers(len(m))), report)
            union.append(m[p])
            zs.append(z[p])
            batches += st["batches"]
            done += int(q)
        union = np.concatenate(union)
        report = None if progress is None else (lambda i, _t: progress(done + i, total))
        final, st = kcenter(np.concatenate(zs), n, int(rng.integers(len(union))), report)
        picks, st = union[final], {"exact_fraction": st["exact_fraction"], "batches": batches + st["batches"]}
    else:
        raise ValueError(f"coreset method must be exact or chunked; got {method!r}")
    if stats is not None:
        stats.update(coreset_method=method, coreset_chunks=chunks, coreset_exact_fraction=st["exact_fraction"],
                     coreset_batches=st["batches"])
    return picks
