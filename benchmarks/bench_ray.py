"""Local executor vs a local Ray (this machine's cores) on real data, in one process run.

1. eval of MVTec AD bottle + a reduced Magnetic-tile (its config through the folder spec, on a
   temp tree of symlinks: ``--mt-free`` defect-free images, ``--mt-per-defect`` per defect type),
   one job per category, the same coreset ratio for both executors: same metrics and image
   scores? wall-time ratio.
2. export-maps of N bottle images (the test images repeated with rotations/flips, written to a
   temp folder that is deleted afterwards) with a model fitted once: same predictions and maps?
   throughput ratio.

    OMP_WAIT_POLICY=PASSIVE nice -n 19 python benchmarks/bench_ray.py --coreset 0.01 --n-images 1000

Both executors run every job at one torch/BLAS thread count (``--cpus-per-task``, default: this
machine's, as a plain local run); the counts the jobs saw are recorded.

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
from pyimgano_core.execution import LocalExecutor, RayExecutor, pinned_threads
from pyimgano_core.runs import METRIC_KEYS, category_jobs, eval_category, export_run
from pyimgano_core.data import load_splits
from pyimgano_core.outputs.files import write_json

CONFIGS = ("configs/mvtec_patchcore_mobilenet.yaml", "configs/magnetic_tile_patchcore.yaml")


def eval_both(executor, cfgs, out: Path) -> tuple[float, dict]:
    jobs = [j for cfg in cfgs for j in category_jobs(cfg, eval_category, out / cfg.name)]
    t0 = time.perf_counter()
    results = executor.run(jobs)
    wall = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{bad[0].name}: {bad[0].error}")
    out_ = {}
    for r in results:
        report = json.loads(Path(r.value["report"]).read_text())
        rows = Path(r.value["report"]).with_name("predictions.jsonl").read_text().splitlines()
        out_[r.name] = {"metrics": r.value["metrics"], "per_defect": r.value["per_defect"], "scores": [json.loads(x)["score"] for x in rows],
                        "cpu_threads": report["protocol"]["cpu_threads"], "counts": r.value["counts"],
                        "fit_s": r.value["timing"]["fit_s"], "total_s": r.value["timing"]["total_s"]}
    return wall, out_


def reduced_magnetic_tile(dst: Path, n_free: int, per_defect: int) -> Path:
    """The first ``n_free`` defect-free and ``per_defect`` images of each defect type (sorted
    names), with their masks, as symlinks in the dataset's own layout."""
    src = Path("../shared/data/magnetic_tile")
    for cls in sorted(p.name for p in src.glob("MT_*")):
        n = n_free if cls == "MT_Free" else per_defect
        (dst / cls / "Imgs").mkdir(parents=True)
        for jpg in sorted((src / cls / "Imgs").glob("*.jpg"))[:n]:
            for f in (jpg, jpg.with_suffix(".png")):
                if f.exists():
                    (dst / cls / "Imgs" / f.name).symlink_to(f.resolve())
    return dst


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


def export_both(cfg, n_images: int, tmp: Path, local_ex, ray_ex) -> dict:
    split = load_splits(cfg.dataset)[0]
    inbox = tmp / "inbox"
    make_images(sorted(s.path for s in split.test), n_images, inbox)
    with pinned_threads(local_ex.threads):
        model, _ = build_model(cfg, split)
    model_dir = model.save(tmp / "model")
    out = {}
    for name, ex in (("local", local_ex), ("ray", ray_ex)):
        t0 = time.perf_counter()
        s = export_run(cfg, tmp / name, model_arg=model_dir, input_dir=inbox, executor=ex)
        wall = time.perf_counter() - t0
        summary = next(iter(s["categories"].values()))
        folder = next((tmp / name).glob("*/*/export"))
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        out[name] = {"wall_s": wall, "images_per_s": n_images / wall, "n_scored": summary["n_scored"], "rows": rows,
                     "cpu_threads": summary.get("cpu_threads"), "shards": summary.get("shards")}
    rl, rr = out["local"].pop("rows"), out["ray"].pop("rows")
    same_rows = [{k: v for k, v in a.items() if k != "files"} for a in rl] == [{k: v for k, v in b.items() if k != "files"} for b in rr]
    same_maps = all(np.array_equal(np.load(a["files"]["map"]), np.load(b["files"]["map"])) for a, b in list(zip(rl, rr))[::25])
    return {"n_images": n_images, "same_predictions": same_rows, "same_maps_every_25th": same_maps,
            "max_abs_score_diff": float(max(abs(a["score"] - b["score"]) for a, b in zip(rl, rr))),
            "throughput_ratio_ray_over_local": out["ray"]["images_per_s"] / out["local"]["images_per_s"], **out}


def start_ray(cpus_per_task: int | None, attempts: int = 6) -> RayExecutor:
    """A local Ray; retried because Ray gives its raylet a fixed 30 s to register, which a
    niced start on a machine loaded ~8x over its cores can miss."""
    from pyimgano_core.errors import ExecutionError

    for attempt in range(1, attempts + 1):
        try:
            return RayExecutor("local", cpus_per_task)
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
    ap.add_argument("--mt-free", type=int, default=150, help="reduced Magnetic-tile: defect-free images (80%% train, 20%% test)")
    ap.add_argument("--mt-per-defect", type=int, default=8, help="reduced Magnetic-tile: test images per defect type")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="threads of every job on both executors (default: this machine's)")
    ap.add_argument("--out", default="reports/ray.json")
    ap.add_argument("--merge", action="store_true", help="keep the other part of an existing --out file (parts run one at a time)")
    ap.add_argument("--machine", default="2 CPU cores shared with other engineers' jobs and benchmarks (load average 8-18)")
    args = ap.parse_args()
    sets = [f"detector.params.coreset.ratio={args.coreset}", *args.set]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if args.merge and out.is_file() else {}  # parts run separately, one file
    doc.update(configs=list(CONFIGS), machine=args.machine)
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray_ex = None
    try:
        mt_root = reduced_magnetic_tile(tmp / "magnetic_tile", args.mt_free, args.mt_per_defect)
        cfgs = [load_config(CONFIGS[0], sets), load_config(CONFIGS[1], [*sets, f"dataset.root={mt_root}"])]
        ray_ex = start_ray(args.cpus_per_task)
        local_ex = LocalExecutor(args.cpus_per_task)
        setup = {"overrides": sets, "cpus_per_task": args.cpus_per_task, "job_threads": ray_ex.threads, "ray_slots": ray_ex.slots}
        if "eval" in args.parts:
            load0 = os.getloadavg()[0]
            t_local, m_local = eval_both(local_ex, cfgs, tmp / "eval-local")
            t_ray, m_ray = eval_both(ray_ex, cfgs, tmp / "eval-ray")
            same = {k: (m_local[k]["metrics"], m_local[k]["per_defect"]) == (m_ray[k]["metrics"], m_ray[k]["per_defect"]) for k in m_local}
            doc["eval"] = {**setup, "magnetic_tile_reduced": {"free": args.mt_free, "per_defect": args.mt_per_defect},
                           "load_average_1min": [load0, os.getloadavg()[0]],
                           "local_wall_s": t_local, "ray_wall_s": t_ray, "wall_ratio_ray_over_local": t_ray / t_local,
                           "same_metrics": same,
                           "same_scores": {k: m_local[k]["scores"] == m_ray[k]["scores"] for k in m_local},
                           "max_abs_score_diff": {k: float(np.max(np.abs(np.subtract(m_local[k]["scores"], m_ray[k]["scores"])))) for k in m_local},
                           "max_abs_metric_diff": {k: max(abs((m_local[k]["metrics"][m] or 0) - (m_ray[k]["metrics"][m] or 0)) for m in METRIC_KEYS)
                                                   for k in m_local},
                           "cpu_threads": {k: {"local": m_local[k]["cpu_threads"], "ray": m_ray[k]["cpu_threads"]} for k in m_local},
                           "counts": {k: {c: v["counts"][c] for c in ("fit", "test", "test_good", "test_anomalous")} for k, v in m_local.items()},
                           "metrics": {k: {m: v["metrics"].get(m) for m in METRIC_KEYS} for k, v in m_local.items()},
                           "per_job_local": {k: {"fit_s": v["fit_s"], "total_s": v["total_s"]} for k, v in m_local.items()},
                           "per_job_ray": {k: {"fit_s": v["fit_s"], "total_s": v["total_s"]} for k, v in m_ray.items()}}
            print(json.dumps(doc["eval"], indent=1), flush=True)
            write_json(out, doc)
        if "export" in args.parts:
            load0 = os.getloadavg()[0]
            doc["export"] = {**setup, **export_both(cfgs[0], args.n_images, tmp, local_ex, ray_ex),
                             "load_average_1min": [load0, os.getloadavg()[0]]}
            print(json.dumps(doc["export"], indent=1), flush=True)
        doc["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        write_json(out, doc)
        out.with_suffix(".md").write_text(markdown(doc))
    finally:
        if ray_ex is not None:
            ray_ex.close()
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(doc: dict) -> str:
    """The few numbers of the run(s), for reports/ray.md."""
    lines = ["# Local executor vs local Ray, real data", "",
             f"Machine: {doc['machine']}. Wall times are noisy here: each ratio comes from one process run "
             "(both executors back to back); the 1-minute load average at its start and end is given.", ""]

    def setup(part: dict) -> str:
        return (f"Overrides for both executors: {', '.join(part['overrides'])}; every job at {part['job_threads']} torch/BLAS "
                f"thread(s) (cpus_per_task {part['cpus_per_task']}; None = this machine's count), {part['ray_slots']} Ray slot(s); "
                f"load average {part['load_average_1min'][0]:.1f} -> {part['load_average_1min'][1]:.1f}.")

    if "eval" in doc:
        e = doc["eval"]
        mt = e["magnetic_tile_reduced"]
        lines += ["## eval: bottle + reduced Magnetic-tile (" + ", ".join(doc["configs"]) + ")", "",
                  setup(e), f"Magnetic-tile reduced to the first {mt['free']} defect-free images (sorted) and {mt['per_defect']} per defect type.", "",
                  f"Same metrics (overall and per defect): {e['same_metrics']}; same image scores: {e['same_scores']}; "
                  f"largest score difference {e['max_abs_score_diff']}; job thread counts {e['cpu_threads']}.",
                  f"Wall: local {e['local_wall_s']:.0f} s, Ray {e['ray_wall_s']:.0f} s, ratio Ray/local {e['wall_ratio_ray_over_local']:.2f}.", "",
                  "| category | fit / test images | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
        for cat, m in e["metrics"].items():
            c = e["counts"][cat]
            lines.append(f"| {cat} | {c['fit']} / {c['test']} | " + " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in METRIC_KEYS) + " |")
        lines.append("")
    if "export" in doc:
        x = doc["export"]
        lines += [f"## export-maps of {x['n_images']} bottle images (test images rotated/flipped), one fitted model", "",
                  setup(x), "",
                  f"Same predictions (path, score, decision, defect area, regions) in the same order: {x['same_predictions']}; "
                  f"same maps (every 25th compared): {x['same_maps_every_25th']}; largest score difference {x['max_abs_score_diff']:.3g}; "
                  f"thread counts local {x['local']['cpu_threads']}, Ray {sorted({s['cpu_threads'] for s in (x['ray']['shards'] or {}).values()})}.",
                  f"Throughput: local {x['local']['images_per_s']:.2f} img/s, Ray {x['ray']['images_per_s']:.2f} img/s "
                  f"({len(x['ray']['shards'] or {})} shards), ratio Ray/local {x['throughput_ratio_ray_over_local']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
