"""Disk-backed store of a fit's training patch features: spill in batches, read back in chunks.

A memory-bank detector needs every training patch once (coreset search, SoftPatch's
per-position statistics) but only a small share of them afterwards (the memory bank). The
store appends each batch of features ``[rows, D]`` float32 to one raw file in a temporary
folder of the run, so the fit holds one batch of full features at a time; readers get row
ranges (``store[a:b]``) and gathered rows (``store[idx]``) through positional reads. Reads do not
go through a memory map on purpose: mapped pages count as the process's resident memory, plain
reads only use the page cache, which the kernel reclaims.

The folder is removed when the ``with`` block ends, whatever ends it: normal exit, an error,
Ctrl-C, or SIGTERM (turned into ``SystemExit(143)`` while the store is open, in the main
thread). A full disk or an unwritable folder raises :class:`~pyimgano_core.errors.ResourceError`
(one line, exit code 7) after removing what was written.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import ResourceError

_READ_ROWS = 16384  # rows per read when gathering: bounded memory, few system calls


class FeatureStore:
    """Append-only float32 ``[rows, dim]`` array in a temporary folder; use as a context manager.

    Parameters
    ----------
    parent
        Folder in which the temporary folder is made (None: the system temp dir, ``TMPDIR``).
    """

    def __init__(self, parent: str | os.PathLike | None = None):
        self.parent = parent
        self.folder: Path | None = None
        self.rows, self.dim = 0, None
        self._fh = None
        self._old_term = None

    # -- lifetime ------------------------------------------------------------------------
    def __enter__(self) -> "FeatureStore":
        where = self.parent or tempfile.gettempdir()
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="pyimgano-features-", dir=where))
            self.path = self.folder / "features.f32"
            self._fh = open(self.path, "w+b", buffering=0)
        except OSError as exc:
            self._remove()
            raise ResourceError(f"cannot create the feature spill folder in {where}: {exc.strerror or exc} "
                                f"(set detector.params.spill_dir to a writable folder)") from None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _terminate)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the folder and restore the SIGTERM handler (idempotent)."""
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        self._remove()

    def _remove(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.removed = not self.folder.exists()

    # -- writing -------------------------------------------------------------------------
    def append(self, rows: np.ndarray) -> None:
        """Spill ``rows`` [n, dim] (converted to float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or (self.dim is not None and rows.shape[1] != self.dim):
            raise ValueError(f"store rows must be [n, {self.dim}], got {rows.shape}")
        self.dim = rows.shape[1]
        try:
            view, done = memoryview(rows.reshape(-1).view(np.uint8)), 0
            while done < len(view):  # unbuffered writes may be partial
                done += self._fh.write(view[done:])
        except OSError as exc:
            where = self.folder
            self.close()
            raise ResourceError(f"cannot spill training features to {where}: {exc.strerror or exc} "
                                f"(free disk space, set detector.params.spill_dir, or lower image_size)") from None
        self.rows += len(rows)

    # -- reading -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.dim or 0

    @property
    def nbytes(self) -> int:
        return self.rows * (self.dim or 0) * 4

    def __len__(self) -> int:
        return self.rows

    def _read(self, start: int, stop: int) -> np.ndarray:
        n = stop - start
        buf = np.empty((n, self.dim), np.float32)
        view, done, offset = memoryview(buf.reshape(-1).view(np.uint8)), 0, start * self.dim * 4
        while done < len(view):
            got = os.preadv(self._fh.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise ResourceError(f"feature spill file {self.path} is shorter than expected")
            done += got
        return buf

    def __getitem__(self, key) -> np.ndarray:
        """``store[a:b]`` (contiguous rows) or ``store[idx]`` (int array, any order) -> float32 array."""
        if isinstance(key, slice):
            start, stop, step = key.indices(self.rows)
            if step != 1:
                raise ValueError("store slices must have step 1")
            return self._read(start, max(start, stop))
        idx = np.asarray(key, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= self.rows)):
            raise IndexError(f"store rows out of range [0, {self.rows})")
        out = np.empty((len(idx), self.dim), np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        # read the chunks that hold requested rows, one chunk at a time
        for s in np.unique(sorted_idx // _READ_ROWS) * _READ_ROWS:
            lo, hi = np.searchsorted(sorted_idx, [s, s + _READ_ROWS])
            chunk = self._read(int(s), int(min(s + _READ_ROWS, self.rows)))
            out[order[lo:hi]] = chunk[sorted_idx[lo:hi] - s]
        return out

    def describe(self) -> dict:
        """What was spilled and where (for the fit report)."""
        return {"folder": str(self.folder), "rows": int(self.rows), "dim": int(self.dim or 0),
                "gib": round(self.nbytes / 2**30, 3)}


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)
