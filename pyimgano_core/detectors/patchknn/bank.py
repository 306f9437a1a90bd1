"""Training features -> memory bank: spill to disk, estimate the peak first, select the rows.

A fit sees every training patch once (coreset search, SoftPatch's per-position statistics) but
keeps only a share. Features go through a disk-backed :class:`~...features.store.FeatureStore`
(bounded memory). After the first batch the fit's peak memory is estimated from the number of
patches it implies and checked against ``max_memory_gb`` before the rest is extracted. The
detector's ``select(store, grid_hw) -> rows`` chooses the memory rows (a coreset, or SoftPatch's
filter then a coreset); with ``tiling.bank: per_tile`` it runs once per tile position.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from typing import Callable, Iterator

import numpy as np

from ...errors import ResourceError
from ...features.store import FeatureStore

log = logging.getLogger(__name__)
Report = Callable[[str, int, "int | None"], None]  # (stage, done, total)
Select = Callable[[FeatureStore, "tuple[int, int] | None"], np.ndarray]


def current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate(needs: dict[str, int], n_patches: int, dim: int, limit_gb: float | None) -> dict:
    """The fit's expected peak (bytes of its large arrays ``needs`` on top of what is resident now).

    Raises :class:`ResourceError` when it exceeds ``limit_gb`` (``max_memory_gb``).
    """
    read = 2 * (1 << 14) * dim * 4  # a chunk of spilled rows being read, plus its projection
    base = current_rss()
    peak = base + max(needs.values(), default=0) + read
    est = {"patches": n_patches, "dim": dim, "spill_bytes": n_patches * dim * 4,
           **{f"{k}_bytes": v for k, v in needs.items()}, "base_bytes": base, "expected_peak_bytes": peak,
           "expected_peak_gib": round(peak / 2**30, 3)}
    log.info("fit estimate: %s patches x %s dims, memory bank %.2f GiB, expected peak %.2f GiB",
             f"{n_patches:,}", dim, needs["memory_bank"] / 2**30, peak / 2**30)
    if limit_gb is not None and peak > limit_gb * 2**30:
        raise ResourceError(
            f"the fit would need about {peak / 2**30:.1f} GiB ({n_patches:,} training patches x {dim} dims, "
            f"memory bank {needs['memory_bank'] / 2**30:.1f} GiB) but max_memory_gb is {limit_gb:g}: lower "
            f"coreset.ratio, image_size, or tap a smaller (shallower) layer, or use fewer training images")
    return est


def stage_label(est: dict) -> str:
    return (f"features: {est['patches']:,} patches, memory bank {est['memory_bank_bytes'] / 2**30:.2f} GiB, "
            f"expected peak {est['expected_peak_gib']:.1f} GiB")


def spill(batches: Iterator, store: FeatureStore, total: int, check: Callable[[int, int], dict],
          on_first: Callable[[tuple[int, int]], None], transform=None, report: Report | None = None) -> tuple[int, int] | None:
    """Append the rows of every embedded batch ``(feats [B, h, w, D], batch)`` to ``store``.

    ``total``: the model inputs the batches hold (for progress and the estimate);
    ``check(n_patches, dim) -> estimate`` runs after the first batch; ``on_first(grid_hw)``
    checks the grid then. ``transform(feats, batch) -> rows`` selects / normalises rows.
    Returns the patch grid (None when it varies between inputs, which needs a ``transform``).
    """
    grid_hw, seen, stage = None, 0, "extracting features"
    for feats, batch in batches:
        if seen == 0:
            grid_hw = feats.shape[1:3]
            on_first(grid_hw)
        elif grid_hw is not None and feats.shape[1:3] != grid_hw:
            if transform is None:
                raise ValueError("training images give patch grids of different sizes; use a fixed image_size (squash)")
            grid_hw = None
        rows = feats.reshape(-1, feats.shape[-1]) if transform is None else transform(feats, batch)
        if seen == 0:
            stage = stage_label(check(int(round(len(rows) * total / len(feats))), rows.shape[-1]))
        store.append(rows)
        seen += len(feats)
        if report is not None:
            report(stage, seen, total)
    return grid_hw


def build_shared(batches: Iterator, total: int, select: Select, check, on_first, spill_dir: str | None,
                 timing: dict, transform=None, report: Report | None = None) -> tuple[np.ndarray, int]:
    """One memory bank from every input's rows: (memory [M, D] float32, training patches)."""
    with FeatureStore(spill_dir) as store:
        grid_hw = spill(batches, store, total, check, on_first, transform, report)
        t0 = time.perf_counter()
        memory = select(store, grid_hw)
        timing["memory_s"] = time.perf_counter() - t0
        n = int(len(store))
        timing["spill"] = store.describe()
    timing["spill"]["removed"] = store.removed
    return memory, n


def build_per_tile(batches: Iterator, total: int, n_pos: int, select: Select, check, spill_dir: str | None,
                   timing: dict, transform=None, report: Report | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One bank per tile position: (memory [M, D] of the banks one after another, offsets [P+1], patches).

    ``transform`` (the detector's, e.g. L2 normalisation) must keep every row: the rows of a
    tile position are picked from its tiles' patches.
    """
    with ExitStack() as stack:
        stores = [stack.enter_context(FeatureStore(spill_dir)) for _ in range(n_pos)]
        grid_hw, seen = None, 0
        for feats, batch in batches:
            if grid_hw is None:
                grid_hw = feats.shape[1:3]
                # an upper bound: the coreset search of one position sees 1/n_pos of these patches
                check(int(np.prod(grid_hw)) * total, feats.shape[-1])
            rows = feats.reshape(-1, feats.shape[-1]) if transform is None else transform(feats, batch)
            if len(rows) != feats.shape[0] * feats.shape[1] * feats.shape[2]:
                raise ValueError("tiling.bank: per_tile needs every patch row of every tile (a row filter is not supported)")
            rows = rows.reshape(len(feats), -1, rows.shape[-1])  # (tiles, patches of a tile, D)
            for k in np.unique(batch.pos):
                stores[k].append(rows[batch.pos == k].reshape(-1, rows.shape[-1]))
            seen += len(feats)
            if report is not None:
                report("extracting tile features", seen, total)
        banks, coreset_s = [], 0.0
        for store in stores:
            timing.pop("coreset_s", None)
            banks.append(select(store, grid_hw))
            coreset_s += timing.get("coreset_s", 0.0)
        timing["spill"] = {"stores": n_pos, "rows": int(sum(len(s) for s in stores)), "dim": int(stores[0].dim or 0)}
        n = int(sum(len(s) for s in stores))
    timing["coreset_s"] = coreset_s
    memory = np.ascontiguousarray(np.concatenate(banks), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in banks])]).astype(np.int64)
    return memory, offsets, n
