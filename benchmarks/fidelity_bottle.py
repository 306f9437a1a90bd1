"""Before/after of issue 13's default changes on MVTec AD bottle (MobileNetV2, offline).

For each detector the model is fitted ONCE with the shipped config, then the test split is
evaluated through the engine (``evaluate_split``: same metrics, original 900x900 resolution,
AUPRO to FPR 0.3) under the old and the new value of the one parameter whose default moved a
metric. Only test-time scoring differs between the two, so the fit (embedding, coreset, LOF)
is shared and the comparison isolates that parameter:

- PatchCore (configs/mvtec_patchcore_mobilenet.yaml): ``distance`` euclidean -> squared
- SoftPatch (configs/mvtec_softpatch_mobilenet.yaml), clean and 10% contaminated
  (``dataset.contamination: {ratio: 0.1, seed: 0, overlap: false}``): ``distance`` euclidean -> squared
- AnomalyDINO MobileNetV2 stand-in (configs/mvtec_anomalydino_mobilenet.yaml):
  ``blur_at`` input -> original

The other default changes of issue 13 (weights V1, shorter-side geometry, raster mask
morphology, reference few-shot slice, per-category masking) do not change these runs: the
configs give a local checkpoint and square images, masking is off for bottle, all runs are
full-shot.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/fidelity_bottle.py     # ~10 min on 2 shared cores

Writes reports/fidelity.json and reports/fidelity.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyimgano_core.config import load_config
from pyimgano_core.data import load_splits
from pyimgano_core.engine import build_model, evaluate_split
from pyimgano_core.outputs.files import write_json
from pyimgano_core.outputs.report.versions import versions

ROOT = Path(__file__).resolve().parents[1]
NOISY = ["dataset.contamination.ratio=0.1", "dataset.contamination.seed=0", "dataset.contamination.overlap=false"]
CASES = [  # (label, config, dataset overrides, parameter, old value, new value)
    ("PatchCore", "configs/mvtec_patchcore_mobilenet.yaml", [], "distance", "euclidean", "squared"),
    ("SoftPatch clean", "configs/mvtec_softpatch_mobilenet.yaml", [], "distance", "euclidean", "squared"),
    ("SoftPatch 10% contaminated", "configs/mvtec_softpatch_mobilenet.yaml", NOISY, "distance", "euclidean", "squared"),
    ("AnomalyDINO MobileNetV2 stand-in", "configs/mvtec_anomalydino_mobilenet.yaml", [], "blur_at", "input", "original"),
]
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def run_case(label, config, overrides, param, old, new, out: Path) -> dict:
    cfg = load_config(ROOT / config, overrides)
    (split,) = load_splits(cfg.dataset)
    t0 = time.perf_counter()
    model, timing = build_model(cfg, split)
    fit_s = time.perf_counter() - t0
    row = {"case": label, "config": config, "overrides": overrides, "parameter": param, "fit_s": fit_s,
           "n_test": len(split.test), "n_train": len(split.train)}
    for tag, value in (("before", old), ("after", new)):
        vcfg = load_config(ROOT / config, overrides + [f"detector.params.{param}={value}"])
        model.detector.params_ = model.detector.params_.model_copy(update={param: value})
        t1 = time.perf_counter()
        report = evaluate_split(vcfg, split, model, out / f"{cfg.name}_{len(overrides)}" / f"{param}_{value}")
        row[tag] = {"value": value, **{k: report["metrics"].get(k) for k in METRICS}, "eval_s": time.perf_counter() - t1}
    print(json.dumps({k: row[k] for k in ("case", "before", "after")}), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "### Issue 13: default changes that move a metric, MVTec AD bottle, MobileNetV2 (offline)",
        "",
        "One fit per row, evaluated under the old and the new default (`benchmarks/fidelity_bottle.py`).",
        "Pixel metrics at the original 900x900 mask resolution, AUPRO to FPR 0.3. The contaminated run",
        "moves 20 defective test images into training (63 test images remain).",
        "",
        "| detector (training) | parameter: before -> after | test images | image AUROC | pixel AUROC | AUPRO | pixel AP |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        cells = [f"{b[k]:.3f} -> {a[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")]
        lines.append(f"| {r['case']} | `{r['parameter']}`: {b['value']} -> {a['value']} | {r['n_test']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "fidelity")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/pyimgano_fidelity_runs"), help="per-run report folders")
    ap.add_argument("--only", nargs="*", help="case labels to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # shared cores: one intra-op thread (sklearn/numpy and torch mix here)
    rows = [run_case(*c, out=args.runs) for c in CASES if not args.only or c[0] in args.only]
    write_json(args.out.with_suffix(".json"), {"rows": rows, "versions": versions(),
                                               "machine": "2 shared CPU cores (timings noisy; accuracies exact)"})
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
