"""Greedy coreset, old vs new, on the README bottle config's real training features, in one run.

    python benchmarks/bench_coreset.py [--images 209] [--ratio 0.1]

"old" is the full-scan greedy of commit 2fb0366 (one float32 BLAS matrix-vector product over all
points per pick), reproduced below; "new" is :func:`pyimgano_core.detectors.patchknn.greedy.kcenter`
(pruned, exact). Both run single-threaded on the same projected features. CPU seconds
(``time.process_time``) are the comparison that survives a shared machine; wall seconds are
given too. Also checked: the memory banks (sorted picks) are identical, and where the pick order
first differs (the old float32 arithmetic breaks near-ties differently from float64). Writes
reports/coreset_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pyimgano_core.detectors.patchknn.greedy import kcenter, project_rows, projection_matrix  # noqa: E402
from pyimgano_core.detectors.patchcore import PatchCore  # noqa: E402

SHARED = REPO.parent / "shared"


def old_greedy(x: np.ndarray, n: int, first: int) -> np.ndarray:
    """The greedy loop of 2fb0366 on already projected points (its thread probing left out: 1 thread)."""
    N = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    xa = np.hstack([-2.0 * x, np.ones((N, 1), np.float32)])
    ca = np.empty(x.shape[1] + 1, np.float32)
    min_d = np.full(N, np.inf, np.float32)
    dist = np.empty(N, np.float32)
    picks = np.empty(n, dtype=np.int64)
    idx = first
    for i in range(n):
        picks[i] = idx
        ca[:-1] = x[idx]
        ca[-1] = sq[idx]
        np.dot(xa, ca, out=dist)
        np.add(dist, sq, out=dist)
        np.minimum(min_d, dist, out=min_d)
        idx = int(min_d.argmax())
    return picks


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=209)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = sorted((SHARED / "data/mvtec_ad/bottle/train/good").glob("*.png"))[: args.images]
    det = PatchCore(backbone="mobilenet_v2", layers=["features.6", "features.13"],
                    weights=str(SHARED / "weights/mobilenet_v2-b0353104.pth"), image_size=224, crop=None)
    det.params_ = det.Params.model_validate(det.params)
    feats = np.concatenate([f for f, _ in det._embed(paths, {})]).reshape(-1, 1024)
    rng = np.random.default_rng(0)  # the detector's draws for seed 0: projection, then first pick
    x = project_rows(feats, None, projection_matrix(1024, 128, rng))
    first, n = int(rng.integers(len(x))), int(len(x) * args.ratio)
    del feats
    with threadpool_limits(1, "blas"):
        old, c_old, w_old = timed(lambda: old_greedy(x, n, first))
        (new, stats), c_new, w_new = timed(lambda: kcenter(x, n, first))
    same_order = old == new
    res = {
        "images": len(paths), "patches": len(x), "picks": n, "projection_dim": 128,
        "old_cpu_s": round(c_old, 1), "new_cpu_s": round(c_new, 1), "speedup_cpu": round(c_old / c_new, 2),
        "old_wall_s": round(w_old, 1), "new_wall_s": round(w_new, 1), "speedup_wall": round(w_old / w_new, 2),
        "same_memory_bank": bool(np.array_equal(np.sort(old), np.sort(new))),
        "same_pick_order": bool(same_order.all()),
        "first_order_difference": None if same_order.all() else int(np.argmin(same_order)),
        "exact_fraction": round(stats["exact_fraction"], 4), "batches": stats["batches"],
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(res, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coreset_speed.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "coreset_speed.md").write_text(
        "# Greedy coreset: old (full scan, 2fb0366) vs new (batched exact), one run\n\n"
        f"`python benchmarks/bench_coreset.py --images {args.images} --ratio {args.ratio}`; bottle train features of the README "
        f"config (MobileNetV2, 224 squash), {len(x):,} patches, {n:,} picks, 128-d projection, 1 thread each. Shared "
        f"2-core machine (load average {res['load_average_1min']} at the end): compare the CPU seconds.\n\n"
        "| | old | new | ratio |\n| --- | --- | --- | --- |\n"
        f"| CPU s | {res['old_cpu_s']} | {res['new_cpu_s']} | {res['speedup_cpu']}x |\n"
        f"| wall s | {res['old_wall_s']} | {res['new_wall_s']} | {res['speedup_wall']}x |\n\n"
        f"Same memory bank (sorted picks): {res['same_memory_bank']}; same pick order: {res['same_pick_order']}"
        + ("" if same_order.all() else f" (first difference at pick {res['first_order_difference']}: float32 vs float64 near-ties)")
        + f". The new method applied its picks to all points in {res['batches']} batched matrix products; "
        f"share of (point, pick) pairs that needed the float64 distance: {res['exact_fraction']:.4f}.\n")


if __name__ == "__main__":
    main()
