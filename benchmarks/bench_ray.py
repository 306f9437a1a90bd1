"""Local executor vs a local Ray (this machine's cores) on real data, in one process run.

1. eval of MVTec AD bottle + Magnetic-tile (their two configs; one job per category, the same
   coreset ratio for both executors): same metrics? wall-time ratio.
2. export-maps of N bottle images (the test images repeated with rotations/flips, written to a
   temp folder that is deleted afterwards) with a model fitted once: same predictions and maps?
   throughput ratio.

    OMP_WAIT_POLICY=PASSIVE nice -n 19 python benchmarks/bench_ray.py --coreset 0.01 --n-images 1000

Writes reports/ray.json and reports/ray.md. On a shared machine the wall times are noisy: read
the ratios (both executors measured in this one process run). Ray's machine-wide memory monitor
is switched off here (as in the tests): on a machine shared with other jobs it kills our
workers for memory that other processes use, which would measure the neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pyimgano_core.config import load_config
from pyimgano_core.engine import build_model
from pyimgano_core.execution import LocalExecutor, RayExecutor
from pyimgano_core.runs import METRIC_KEYS, category_jobs, eval_category, export_run
from pyimgano_core.data import load_splits
from pyimgano_core.reports import write_json

CONFIGS = ("configs/mvtec_patchcore_mobilenet.yaml", "configs/magnetic_tile_patchcore.yaml")


def eval_both(executor, cfgs, out: Path) -> tuple[float, dict]:
    jobs = [j for cfg in cfgs for j in category_jobs(cfg, eval_category, out / cfg.name)]
    t0 = time.perf_counter()
    results = executor.run(jobs)
    wall = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{bad[0].name}: {bad[0].error}")
    return wall, {r.name: {"metrics": r.value["metrics"], "per_defect": r.value["per_defect"],
                           "fit_s": r.value["timing"]["fit_s"], "total_s": r.value["timing"]["total_s"]} for r in results}


def make_images(src: list[Path], n: int, folder: Path) -> None:
    """``n`` images: test image i % len(src) under variant i // len(src) (4 rotations x 3 flips)."""
    rots = (None, cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)
    for i in range(n):
        v = i // len(src)
        img = cv2.imread(str(src[i % len(src)]), cv2.IMREAD_COLOR)
        if rots[v % 4] is not None:
            img = cv2.rotate(img, rots[v % 4])
        if (v // 4) % 3:
            img = cv2.flip(img, (v // 4) % 3 - 1)
        (folder / f"v{v:02d}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"v{v:02d}" / f"{i:04d}.png"), img)


def export_both(cfg, n_images: int, tmp: Path, ray_ex) -> dict:
    split = load_splits(cfg.dataset)[0]
    inbox = tmp / "inbox"
    make_images(sorted(s.path for s in split.test), n_images, inbox)
    model, _ = build_model(cfg, split)
    model_dir = model.save(tmp / "model")
    out = {}
    for name, ex in (("local", LocalExecutor()), ("ray", ray_ex)):
        t0 = time.perf_counter()
        s = export_run(cfg, tmp / name, model_arg=model_dir, input_dir=inbox, executor=ex)
        wall = time.perf_counter() - t0
        summary = next(iter(s["categories"].values()))
        folder = next((tmp / name).glob("*/*/export"))
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        out[name] = {"wall_s": wall, "images_per_s": n_images / wall, "n_scored": summary["n_scored"], "rows": rows,
                     "shards": summary.get("shards")}
    rl, rr = out["local"].pop("rows"), out["ray"].pop("rows")
    same_rows = [{k: v for k, v in a.items() if k != "files"} for a in rl] == [{k: v for k, v in b.items() if k != "files"} for b in rr]
    same_maps = all(np.array_equal(np.load(a["files"]["map"]), np.load(b["files"]["map"])) for a, b in list(zip(rl, rr))[::25])
    return {"n_images": n_images, "same_predictions": same_rows, "same_maps_every_25th": same_maps,
            "max_abs_score_diff": float(max(abs(a["score"] - b["score"]) for a, b in zip(rl, rr))),
            "throughput_ratio_ray_over_local": out["ray"]["images_per_s"] / out["local"]["images_per_s"], **out}


def start_ray(attempts: int = 6) -> RayExecutor:
    """A local Ray; retried because Ray gives its raylet a fixed 30 s to register, which a
    niced start on a machine loaded ~8x over its cores can miss."""
    from pyimgano_core.errors import ExecutionError

    for attempt in range(1, attempts + 1):
        try:
            return RayExecutor("local")
        except ExecutionError as exc:
            print(f"Ray start {attempt}/{attempts} failed: {exc}", flush=True)
            time.sleep(10)
    raise SystemExit("could not start a local Ray")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coreset", type=float, default=0.01)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--parts", default="eval,export")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both configs (same for both executors)")
    ap.add_argument("--out", default="reports/ray.json")
    ap.add_argument("--machine", default="2 CPU cores shared with other engineers' jobs and benchmarks (load average 8-18)")
    args = ap.parse_args()
    sets = [f"detector.params.coreset_ratio={args.coreset}", *args.set]
    cfgs = [load_config(c, sets) for c in CONFIGS]
    doc = {"coreset_ratio": args.coreset, "overrides": sets, "n_images": args.n_images, "configs": list(CONFIGS), "machine": args.machine}
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray_ex = start_ray()
    doc["ray_slots"] = ray_ex.slots
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        if "eval" in args.parts:
            t_local, m_local = eval_both(LocalExecutor(), cfgs, tmp / "eval-local")
            t_ray, m_ray = eval_both(ray_ex, cfgs, tmp / "eval-ray")
            same = {k: (m_local[k]["metrics"], m_local[k]["per_defect"]) == (m_ray[k]["metrics"], m_ray[k]["per_defect"]) for k in m_local}
            doc["eval"] = {"local_wall_s": t_local, "ray_wall_s": t_ray, "wall_ratio_ray_over_local": t_ray / t_local,
                           "same_metrics": same, "metrics": {k: {m: v["metrics"].get(m) for m in METRIC_KEYS} for k, v in m_local.items()},
                           "per_job_local": {k: {"fit_s": v["fit_s"], "total_s": v["total_s"]} for k, v in m_local.items()},
                           "per_job_ray": {k: {"fit_s": v["fit_s"], "total_s": v["total_s"]} for k, v in m_ray.items()}}
            print(json.dumps(doc["eval"], indent=1), flush=True)
            write_json(args.out, doc)
        if "export" in args.parts:
            doc["export"] = export_both(cfgs[0], args.n_images, tmp, ray_ex)
            print(json.dumps(doc["export"], indent=1), flush=True)
        doc["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_json(args.out, doc)
        Path(args.out).with_suffix(".md").write_text(markdown(doc))
    finally:
        ray_ex.close()
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(doc: dict) -> str:
    """The few numbers of the run, for reports/ray.md."""
    lines = [f"# Local executor vs local Ray ({doc.get('ray_slots')} slots), one run", "",
             f"Machine: {doc['machine']}. Overrides for both executors: {', '.join(doc['overrides'])}. "
             "Wall times are noisy here; the ratios come from one process run.", ""]
    if "eval" in doc:
        e = doc["eval"]
        lines += ["## eval: " + ", ".join(doc["configs"]), "",
                  f"Same metrics (overall and per defect) on every category: {all(e['same_metrics'].values())} {e['same_metrics']}.",
                  f"Wall: local {e['local_wall_s']:.0f} s, Ray {e['ray_wall_s']:.0f} s, ratio Ray/local {e['wall_ratio_ray_over_local']:.2f}.", "",
                  "| category | " + " | ".join(METRIC_KEYS) + " |", "|---|" + "---|" * len(METRIC_KEYS)]
        for cat, m in e["metrics"].items():
            lines.append(f"| {cat} | " + " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in METRIC_KEYS) + " |")
        lines.append("")
    if "export" in doc:
        x = doc["export"]
        lines += [f"## export-maps of {x['n_images']} bottle images (test images rotated/flipped), one fitted model", "",
                  f"Same predictions (path, score, decision, defect area, regions) in the same order: {x['same_predictions']}; "
                  f"same maps (every 25th compared): {x['same_maps_every_25th']}; largest score difference {x['max_abs_score_diff']:.3g}.",
                  f"Throughput: local {x['local']['images_per_s']:.2f} img/s, Ray {x['ray']['images_per_s']:.2f} img/s "
                  f"({len(x['ray']['shards'] or {})} shards), ratio Ray/local {x['throughput_ratio_ray_over_local']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
