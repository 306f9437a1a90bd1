"""Files: checked before work, written atomically under our own temp names, locked, tidied; strict JSON.

* :func:`check_writable` runs before any fitting or scoring: a read-only folder, a ``--out``
  that is a file, or a file where a run folder must go fails at once with one line.
* Temp names carry the writer's pid (``.<name>.<pid>.<random>``): concurrent writers never
  share one, and :func:`clean_stale` removes those whose process is gone (a run killed by
  SIGKILL or a power cut) on the next run, without touching a live writer's files.
* :func:`folder_lock` gives one writer at a time per output folder; a second one is refused
  at once with one line naming the holder.
* Files and folders get the permissions an ordinary ``open()``/``mkdir`` would give (the
  umask), not the 0600/0700 of ``mkstemp``/``mkdtemp``, so a viewer running as another user
  can read them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import OutputError, ResourceError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe


def file_mode() -> int:
    return 0o666 & ~_UMASK


def dir_mode() -> int:
    return 0o777 & ~_UMASK


def temp_path(target: Path, suffix: str = "") -> Path:
    """A unique sibling temp name for ``target``: ``.<name>.<pid>.<random><suffix>``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours to signal, or cannot tell: leave it alone
    return True


def clean_stale(folder: Path, name: str) -> list[Path]:
    """Remove our temp leftovers for ``name`` in ``folder`` whose writing process is gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}(\..*)?$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def write_error(exc: OSError, message: str) -> OutputError | ResourceError:
    """The one-line error for a failed write: a full disk or quota is a resource (exit 7, as the
    README promises), anything else an output location problem (exit 2)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"{message}: no space left on the device (free some space or write elsewhere)")
    return OutputError(f"{message}: {_describe(exc)}")


def check_writable(folder: Path, what: str = "output folder") -> Path:
    """Create ``folder`` (and parents) and prove a file can be written there; else one line."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputError(f"Cannot write the {what} {folder}: {parent} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise write_error(exc, f"Cannot write the {what} {folder}") from None
    return folder


def make_dirs(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"Cannot create folder {folder}: a file of that name is in the way") from None
    except OSError as exc:
        raise write_error(exc, f"Cannot create folder {folder}") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temp file + rename; OSError -> one-line OutputError."""
    make_dirs(path.parent)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode filtered by the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, f"Cannot write {path}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold ``<folder>/.pyimgano.lock`` for the duration; refuse at once if another run holds it.

    The lock file is removed on release (while still locked), so no file naming a dead pid stays
    behind; a run that opened the old file just before the removal sees that its file is no
    longer the one at the path and takes the lock on the new one.
    """
    make_dirs(folder)
    path = folder / ".pyimgano.lock"
    while True:
        fd = _open_lock(path, folder)
        try:
            _lock(fd)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{folder} is being written by another run ({holder}); wait for it or use another --out") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {command}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still locked: nobody can hold a lock on this file now
        os.close(fd)  # closing releases the lock


def _open_lock(path: Path, folder: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"Cannot lock {folder}: {_describe(exc)}") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------------- strict JSON
def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: strict JSON that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return finite_json(obj.item())
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON (no NaN/Infinity tokens): non-finite numbers become null."""
    return json.dumps(finite_json(obj), default=_default, allow_nan=False, **kw)


def _default(o: Any):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename): a crash never leaves half a report."""
    path = Path(path)
    write_bytes_atomic(path, (dumps(obj, indent=2) + "\n").encode())
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    write_bytes_atomic(path, "".join(dumps(r) + "\n" for r in rows).encode())
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file + rename), like the JSON reports."""
    write_bytes_atomic(Path(path), text.encode("utf-8"))
    return Path(path)
