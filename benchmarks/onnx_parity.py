"""ONNX vs torch on MVTec AD bottle: parity on every test image, and per-image latency.

For configs/mvtec_patchcore_mobilenet.yaml (the README config) and
configs/mvtec_softpatch_mobilenet.yaml, fitted with ``--set calibration.holdout_fraction=0.1``
(so the model has thresholds): ``pyimgano export-onnx`` (its own parity check on the
calibration images), then both runtimes through the engine's ``score_stream`` on all 83 test
images: largest score and map difference (maps at the original 900x900, after post-processing),
is_anomalous decisions at the calibrated threshold. Latency: one image per call, end to end
(decode, geometry, network, kNN, maps, back to 900x900), torch and onnxruntime alternating image
by image in one process, both on 2 threads; medians and their ratio.

    python benchmarks/onnx_parity.py --models /tmp/runs      # fits the models there if absent

Timings are wall-clock on a machine shared with other jobs: compare the ratio, not the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pyimgano_core, whatever is installed
CONFIGS = {"patchcore": "configs/mvtec_patchcore_mobilenet.yaml", "softpatch": "configs/mvtec_softpatch_mobilenet.yaml"}
OVERRIDES = ["calibration.holdout_fraction=0.1"]


def fitted(cfg, models: Path) -> Path:
    from pyimgano_core.runs import fit_run

    folder = models / cfg.name / "bottle" / "model"
    if not (folder / "model.json").is_file():
        fit_run(cfg, models)
    return folder


def latency(torch_model, onnx_model, paths: list, threads: int) -> dict:
    import torch

    from pyimgano_core.engine import score_stream

    torch.set_num_threads(threads)
    times = {"torch": [], "onnx": []}
    for p in paths[:1]:  # warm-up: first calls allocate
        for m in (torch_model, onnx_model):
            list(score_stream(m, [p]))
    for p in paths:
        for name, m in (("torch", torch_model), ("onnx", onnx_model)):
            t0 = time.perf_counter()
            list(score_stream(m, [p]))
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"threads": threads, "n_images": len(paths), "median_s": med, "onnx_over_torch": med["onnx"] / med["torch"],
            "p90_s": {k: float(np.percentile(v, 90)) for k, v in times.items()}}


def run_one(key: str, models: Path, n_latency: int, threads: int) -> dict:
    from pyimgano_core.config import load_config
    from pyimgano_core.data import load_splits
    from pyimgano_core.deploy.onnx_export import compare, export_onnx
    from pyimgano_core.deploy.onnx_runtime import load_onnx_model
    from pyimgano_core.model import Model

    cfg = load_config(ROOT / CONFIGS[key], OVERRIDES)
    folder = fitted(cfg, models)
    t0 = time.perf_counter()
    info = export_onnx(folder)
    export_s = time.perf_counter() - t0
    torch_model, onnx_model = Model.load(folder), load_onnx_model(folder, threads=threads)
    test = load_splits(cfg.dataset)[0].test
    paths = [s.path for s in test]
    t0 = time.perf_counter()
    full = compare(torch_model, onnx_model, paths)
    thr = torch_model.thresholds
    return {
        "config": CONFIGS[key], "overrides": OVERRIDES, "model": str(folder), "export_s": export_s,
        "onnx_file_mb": (folder / info["file"]).stat().st_size / 2**20, "export_parity": info["parity"],
        "test_parity": {**full, "seconds": time.perf_counter() - t0},
        "thresholds": thr.to_dict() if thr else None,
        "memory_bank": list(np.load(folder / "arrays.npz")["memory_"].shape),
        "latency": latency(torch_model, onnx_model, paths[:n_latency], threads),
    }


def markdown(res: dict) -> str:
    lines = ["# ONNX export: parity with the torch path and latency (MVTec AD bottle, MobileNetV2)", "",
             f"`python benchmarks/onnx_parity.py [--only NAME]` ({res['machine']}; each row's date below). The machine was "
             "shared with other engineers' jobs (load average ~15-25 on 2 cores): latencies are noisy and slow, "
             "compare the ratio within a row (one process, images alternating).", "",
             "| config | test images | max score diff (rel / abs) | max map diff (rel / abs) | decision flips | "
             "torch s/img | ORT s/img | ORT/torch |", "|---|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        p, lat = r["test_parity"], r["latency"]
        lines.append(f"| {r['config']} | {p['n_images']} | {p['max_score_rel_diff']:.2e} / {p['max_score_abs_diff']:.2e} | "
                     f"{p['max_map_rel_diff']:.2e} / {p['max_map_abs_diff']:.2e} | {p['decision_flips']} | "
                     f"{lat['median_s']['torch']:.3f} | {lat['median_s']['onnx']:.3f} | {lat['onnx_over_torch']:.2f} |")
    lines += ["", "Score differences relative to the torch score; map differences (900x900 maps after "
              "post-processing) relative to the largest value of the torch map of that image. Decisions: "
              "`score >= thresholds.image` (calibrated on 10% held-out good training images). Latency: median "
              "over the first test images, one image per call end to end (decode, resize, network, kNN, maps, "
              "back to 900x900), torch and onnxruntime alternating, each on 2 threads."]
    for key, r in res["runs"].items():
        lines.append(f"- {key} ({r.get('date', res['date'])}): memory bank {r['memory_bank']}, ONNX file {r['onnx_file_mb']:.1f} MiB, export + its parity "
                     f"check {r['export_s']:.0f} s; export-time check on {r['export_parity']['n_images']} "
                     f"{r['export_parity']['images']}: score {r['export_parity']['max_score_rel_diff']:.1e}, map "
                     f"{r['export_parity']['max_map_rel_diff']:.1e} (tolerance {r['export_parity']['rtol']:g}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=ROOT / "reports/onnx_models", help="where fitted model folders live")
    ap.add_argument("--only", choices=list(CONFIGS), nargs="*", default=list(CONFIGS))
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "reports/onnx_parity")
    args = ap.parse_args()
    os.chdir(ROOT)
    runs = {k: run_one(k, args.models, args.latency_images, args.threads) for k in args.only}
    for r in runs.values():
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    old = args.out.with_suffix(".json")
    if old.is_file():  # --only adds its configs to an earlier run's file
        runs = {**json.loads(old.read_text()).get("runs", {}), **runs}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "runs": runs}
    import onnxruntime
    import torch

    res["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
