"""Greedy k-center coreset (PatchCore, Roth et al. 2022, Alg. 1), exact and pruned.

The greedy picks a first point with the seed, then repeatedly the point farthest from all
picks so far. Done plainly, every pick recomputes the distance of every point to the new pick:
cost points x picks, i.e. quadratic in the training set. Here a pick recomputes only the
points whose distance it can lower, found with bounds that never exclude such a point (see
:class:`_Greedy`), so the picks are those of the plain loop: same distances, ties to the
lowest index as ``numpy.argmax``. ``touched_fraction`` in the stats is the mean share of the
points that passed the cheap bounds and had a full row read per pick.

Distances are float64 ``sum((x - c)**2)`` over the float32 random projection: the same value
for a row whichever subset it is computed in (the expanded ``|x|^2 - 2x.c + |c|^2`` through BLAS
is not: its kernels round the remainder rows of a block differently), so the pruned run and a
plain loop see identical numbers. float32 forms are used only as filters, with a rigorous
rounding bound and a relative margin of 1e-6 on every test.

``method="chunked"`` is an approximation for very large training sets: the points are split
into consecutive chunks (training images in order) of at most ``chunk_points`` and each
chunk gets its exact greedy coreset with the same share of picks; the union is returned. Cost
grows linearly with the number of chunks instead of quadratically with the training set, and
only one chunk's projection is in memory at a time.
"""
from __future__ import annotations

import time
from typing import Callable, Literal

import numpy as np

CoresetMethod = Literal["exact", "chunked"]
ProgressFn = Callable[[int, int], None]  # (picks done, picks total)

_MARGIN = 1e-6  # relative slack on every bound test (float64 rounding is ~1e-14 here)
_ROWS = 1 << 14  # rows per read of full-dimension features (bounded memory for disk-backed inputs)


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
    """Squared distances float64 [m] of rows ``x`` [m, d] (float32) to ``c`` [d] (float64)."""
    diff = x.astype(np.float64)
    diff -= c
    return np.einsum("ij,ij->i", diff, diff)


class _Greedy:
    """Exact greedy k-center state over rows ``x`` (float32 [N, d]) with per-point pruning.

    Every point remembers its nearest center ``a`` and ``min_d = |x - a|^2``. A new center
    ``c`` can lower ``min_d`` only if all of these hold, tested from the cheapest up:

    1. ``|c - a| < 2 |x - a|`` (triangle inequality; one lookup per point into the
       center-to-center distances);
    2. ``|z_x - z_c|^2 < min_d`` with ``z`` the top principal coordinates: an orthogonal
       projection never lengthens a distance, and 16 floats a row are cheap to read;
    3. the float32 distance through BLAS, less a rigorous bound on its rounding
       (``4 d eps (|x|^2 + |c|^2)``, Higham's gamma_d), is below ``min_d``.

    Only the points passing all three get the float64 distance that decides.
    """

    def __init__(self, x: np.ndarray, n: int):
        N, d = x.shape
        self.x = x
        self.sq = np.einsum("ij,ij->i", x, x)
        self.err = 4.0 * d * float(np.finfo(np.float32).eps)
        self.z, self.zsq = _principal_coords(x)
        self.min_d = np.full(N, np.inf)
        self.assign = np.zeros(N, np.intp)
        self.lim = np.full(N, np.inf, np.float32)  # >= 2 |x - a|, rounded up
        self.centers = np.empty((n, d), np.float32)
        self.center_sq = np.empty(n, np.float32)
        self.touched = 0

    def add(self, i: int, idx: int) -> None:
        """Make row ``idx`` the ``i``-th center and lower the distances it can lower."""
        c, c_sq = self.x[idx], self.sq[idx]
        if i == 0:
            rows = np.arange(len(self.x))
        else:
            a_sq = self.center_sq[:i]
            d2 = a_sq - 2.0 * (self.centers[:i] @ c) + c_sq
            low = np.sqrt(np.maximum(d2 - self.err * (a_sq + c_sq), 0.0))  # <= |c - a|
            rows = np.flatnonzero(np.take(low, self.assign) < self.lim)
            zc, zc_sq = self.z[idx], self.zsq[idx]
            z_sq = self.zsq[rows]
            z2 = z_sq - 2.0 * (self.z[rows] @ zc) + zc_sq
            rows = rows[z2 - self.err * (z_sq + zc_sq) < self.min_d[rows] * (1.0 + _MARGIN)]
        self.touched += len(rows)
        x_sq = self.sq[rows]
        d32 = x_sq - 2.0 * (self.x[rows] @ c) + c_sq
        rows = rows[d32 - self.err * (x_sq + c_sq) < self.min_d[rows] * (1.0 + _MARGIN)]
        d = _sqdist(self.x[rows], c.astype(np.float64))
        closer = d < self.min_d[rows]
        rows, d = rows[closer], d[closer]
        self.min_d[rows] = d
        self.assign[rows] = i
        self.lim[rows] = (2.0 * np.sqrt(d) * (1.0 + _MARGIN)).astype(np.float32)
        self.centers[i], self.center_sq[i] = c, c_sq


def _principal_coords(x: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` principal coordinates of ``x`` (float32 [N, k], computed in float64) and their norms."""
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for s in range(0, len(x), _ROWS):
        xc = x[s : s + _ROWS] - mean
        cov += xc.T @ xc
    v = np.ascontiguousarray(np.linalg.eigh(cov)[1][:, ::-1][:, :k])  # orthonormal columns
    z = np.empty((len(x), min(k, x.shape[1])), np.float32)
    for s in range(0, len(x), _ROWS):
        z[s : s + _ROWS] = (x[s : s + _ROWS] - mean) @ v
    return z, np.einsum("ij,ij->i", z, z)


def kcenter(x: np.ndarray, n: int, first: int, progress: ProgressFn | None = None) -> tuple[np.ndarray, dict]:
    """Exact greedy k-center: ``n`` row indices of ``x`` starting at row ``first``.

    Returns (picks, stats) with stats ``touched_fraction`` (mean share of the points whose
    distance was recomputed per pick) and ``seconds``.
    """
    t0 = time.perf_counter()
    N = len(x)
    n = int(min(max(n, 1), N))
    g = _Greedy(np.ascontiguousarray(x, dtype=np.float32), n)
    picks = g.picks = np.empty(n, np.int64)
    idx = int(first)
    every = max(1, n // 200)
    for i in range(n):
        picks[i] = idx
        if i + 1 < n:
            g.add(i, idx)
            idx = int(np.argmax(g.min_d))  # numpy's tie rule: the lowest index among maxima
        if progress is not None and ((i + 1) % every == 0 or i + 1 == n):
            progress(i + 1, n)
    stats = {"touched_fraction": g.touched / max(N * max(n - 1, 1), 1), "seconds": time.perf_counter() - t0}
    return picks, stats


def greedy_coreset(features, n: int, proj_dim: int = 128, seed: int = 0, method: CoresetMethod = "exact",
                   chunk_points: int = 200_000, rows: np.ndarray | None = None,
                   progress: ProgressFn | None = None, stats: dict | None = None) -> np.ndarray:
    """Indices of ``n`` patches picked by greedy k-center on a random projection to ``proj_dim``.

    ``features`` [N, D] may be disk-backed; ``rows`` restricts the candidates to those rows
    (returned indices are then positions in ``rows``). The projection matrix and the first
    pick come from ``seed`` (the reference code uses a random linear layer). ``method="exact"``
    is the plain greedy's picks; ``"chunked"`` see the module docstring. ``stats`` (a dict)
    receives ``touched_fraction``, ``coreset_method`` and the number of chunks.
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
        bounds = np.linspace(0, N, chunks + 1).round().astype(np.int64)
        sizes = np.diff(bounds)
        quota = np.floor(n * sizes / N).astype(np.int64)  # largest remainders get the leftovers
        quota[np.argsort(-(n * sizes / N - quota), kind="stable")[: n - quota.sum()]] += 1
        out, touched, done = [], 0.0, 0
        for s, e, q in zip(bounds[:-1], bounds[1:], quota):
            sub = np.arange(s, e) if rows is None else rows[s:e]
            report = None if progress is None else (lambda i, _t, d=done: progress(d + i, n))
            p, st = kcenter(project_rows(features, sub, proj), q, int(rng.integers(e - s)), report)
            out.append(p + s)
            touched += st["touched_fraction"] * q
            done += int(q)
        picks, st = np.concatenate(out), {"touched_fraction": touched / max(n, 1)}
    else:
        raise ValueError(f"coreset method must be exact or chunked; got {method!r}")
    if stats is not None:
        stats.update(coreset_method=method, coreset_chunks=chunks, coreset_touched_fraction=st["touched_fraction"])
    return picks
