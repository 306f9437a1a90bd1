"""Sharded scoring: ``export-maps --shard I/N`` for any batch scheduler, ``--ray`` over shards.

The sorted image list is cut into contiguous shards; every image falls in exactly one and the
split depends only on the list, so N independent jobs cover a folder exactly once. On Ray the
shards are tasks: the fitted model travels as the bytes of its saved folder, put in Ray's
object store once (no storage shared between nodes needed; each node fetches it once) and
loaded once per worker process for all the shards it scores. Each shard writes its outputs
under ``shard-IIII-of-NNNN/``; the driver then merges one ``predictions.jsonl`` (in the order
of a local run) and one ``summary.json``. Nothing here imports torch or ray at import time.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .deploy.onnx_runtime import onnx_path, read_doc
from .errors import ConfigError, ExecutionError
from .infer import load_for_runtime
from .execution import Job, JobResult, current_threads, failures, pinned_threads
from .optional import require
from .outputs.files import check_writable, clean_stale, folder_lock, temp_path, write_json


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0-based I, like array-job indices) -> (I, N)."""
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise ConfigError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(i), int(n)


def shard_slice(items: Sequence, index: int, count: int, unit: int = 1) -> list:
    """Shard ``index`` of ``count`` of an already sorted list: contiguous, cut on multiples of ``unit``.

    With ``unit`` the engine's chunk, a shard's predict batches are exactly the local run's
    (same images together), so its float32 sums, and its scores, are the local run's too: the
    matrix products round differently for different batch shapes. Sizes differ by at most one
    ``unit`` (the last shard may hold the remainder)."""
    units = -(-len(items) // unit)
    return list(items[index * units // count * unit : (index + 1) * units // count * unit])


def shard_folder(index: int, count: int) -> str:
    return f"shard-{index:04d}-of-{count:04d}"


# ---------------------------------------------------------------------------------- the model on workers
_MODEL_CACHE: dict = {}


def model_blob(model, folder: Path | None = None) -> dict[str, bytes]:
    """The files of the model's saved folder (``folder``, or a fresh save of ``model``), by relative path."""
    def read(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}  # not locks or temp files

    if folder is not None:
        return read(Path(folder))
    with tempfile.TemporaryDirectory(prefix="pyimgano-model-") as tmp:
        return read(model.save(Path(tmp) / "model"))


def _model_from(handle: list, key: str, runtime: str):
    """This worker's model for ``key``, and whether this call loaded it (first shard only)."""
    loaded = key not in _MODEL_CACHE
    if loaded:
        blob = require("ray", "ray").get(handle[0])
        with tempfile.TemporaryDirectory(prefix="pyimgano-model-") as tmp:
            for rel, data in blob.items():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / rel).write_bytes(data)
            _MODEL_CACHE.clear()  # one model per worker at a time: bounded memory
            _MODEL_CACHE[key] = load_for_runtime(Path(tmp), runtime)
    return _MODEL_CACHE[key], loaded


def export_shard(model: list, key: str, runtime: str, images: list[str], out_dir: str, base: str | None, progress=None) -> dict:
    """One shard of a sharded export (a Ray task): the engine's export over these images."""
    from .engine import export_images

    fitted, loaded = _model_from(model, key, runtime)
    summary = export_images(fitted, [Path(p) for p in images], Path(out_dir), progress, base=Path(base) if base else None)
    return summary | {"worker_pid": os.getpid(), "model_loaded": loaded, "cpu_threads": current_threads()}


def _check_shippable(folder: Path | None, runtime: str) -> None:
    if runtime != "onnx" or folder is None:
        return
    path = onnx_path(folder, read_doc(folder).get("onnx") or {"file": "model.onnx"})
    if Path(folder).resolve() not in path.resolve().parents:
        raise ConfigError(f"--ray ships the model folder to the workers, but its ONNX graph {path} is outside {folder}; "
                          "export it into the folder (pyimgano export-onnx without --out)")


# ---------------------------------------------------------------------------------- export
def export_on(executor, model, images: Sequence, out_dir, progress=None, base=None, shard: tuple[int, int] | None = None,
              folder: Path | None = None, runtime: str = "torch") -> dict:
    """``engine.export_images`` locally, for one ``--shard I/N``, or over shards on Ray (then merged).

    ``folder``: the model's saved folder when it came from disk (shipped as is; needed for
    ``runtime="onnx"``), else the model is saved once to ship it."""
    from .engine import CHUNK, export_images

    out_dir = Path(out_dir)
    if shard is not None or executor.backend == "local":
        with pinned_threads(executor.threads):
            if shard is None:
                return export_images(model, images, out_dir, progress, base=base) | {"cpu_threads": current_threads()}
            i, n = shard
            summary = export_images(model, shard_slice(images, i, n, CHUNK), out_dir / shard_folder(i, n), progress, base=base)
            return summary | {"shard": f"{i}/{n}", "n_images_in_folder": len(images), "cpu_threads": current_threads()}
    _check_shippable(folder, runtime)
    n = max(1, min(math.ceil(len(images) / CHUNK), 4 * executor.slots))
    blob = model_blob(model, folder)
    key = runtime + ":" + hashlib.sha256(b"".join(k.encode() + blob[k] for k in sorted(blob))).hexdigest()[:16]
    handle = executor.share(blob)
    jobs = [Job(shard_folder(i, n), export_shard,
                {"model": handle, "key": key, "runtime": runtime, "images": [str(p) for p in shard_slice(images, i, n, CHUNK)],
                 "out_dir": str(out_dir / shard_folder(i, n)), "base": str(base) if base else None})
            for i in range(n)]
    check_writable(out_dir)
    with folder_lock(out_dir, "export-maps --ray"):  # the merged files; each shard locks its own folder
        clean_stale(out_dir, "predictions.jsonl")
        t0 = time.perf_counter()
        results = executor.run(jobs, progress)
        return merge_shards(out_dir, jobs, results, len(images), time.perf_counter() - t0)


def merge_shards(out_dir: Path, jobs: Sequence[Job], results: Sequence[JobResult], n_images: int, seconds: float) -> dict:
    """One predictions.jsonl (the sorted file order of a local run) and one summary over the shards."""
    done = [(j, r) for j, r in zip(jobs, results) if r.ok]
    partial = temp_path(out_dir / "predictions.jsonl", ".partial")
    try:
        with open(partial, "w") as fh:
            for job, _ in done:
                fh.write((Path(job.kwargs["out_dir"]) / "predictions.jsonl").read_text())
        partial.replace(out_dir / "predictions.jsonl")
    finally:
        partial.unlink(missing_ok=True)
    vals = [r.value for _, r in done]
    n_ok = sum(v["n_scored"] for v in vals)
    anomalous = [v["n_anomalous"] for v in vals]
    first = vals[0] if vals else {}
    summary = {
        "n_images": n_images, "n_scored": n_ok, "n_failed": sum(v["n_failed"] for v in vals),
        "failures": [f for v in vals for f in v["failures"]],
        "n_anomalous": sum(anomalous) if vals and None not in anomalous else None,
        "thresholds": first.get("thresholds"), "display_range": first.get("display_range"),
        "display_range_from": first.get("display_range_from"), "cpu_threads": first.get("cpu_threads"),
        "seconds": seconds, "images_per_s": n_ok / seconds if seconds > 0 else None,
        "peak_rss_mb": max((v["peak_rss_mb"] for v in vals), default=None),  # of the largest worker
        "outputs": "per shard under shard-IIII-of-NNNN/ (" + first.get("outputs", "") + ")",
        "out_dir": str(out_dir),
        "shards": {j.name: {"n_images": len(j.kwargs["images"]), "attempts": r.attempts, "ok": r.ok,
                            **({k: r.value[k] for k in ("worker_pid", "model_loaded", "seconds", "cpu_threads")} if r.ok else {})}
                   for j, r in zip(jobs, results)},
        "failed_shards": failures(results),
    }
    write_json(out_dir / "summary.json", summary)
    if summary["failed_shards"]:
        lost = sum(len(j.kwargs["images"]) for j, r in zip(jobs, results) if not r.ok)
        raise ExecutionError(f"{len(summary['failed_shards'])} shard(s) failed ({', '.join(summary['failed_shards'])}; {lost} images): "
                             f"{next(iter(summary['failed_shards'].values()))['error']}; the other shards' outputs are merged in {out_dir}")
    return summary
