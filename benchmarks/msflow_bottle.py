"""MSFlow on MVTec AD bottle (MobileNetV2, offline, CPU): metrics at several epochs of ONE training.

Trains the detector of ``configs/mvtec_msflow_mobilenet.yaml`` once; after the epochs listed in
``--eval-at`` the partly trained model is evaluated through the engine (``evaluate_split``: maps
back to the original 900x900 masks, image AUROC, pixel AUROC, AUPRO@0.3). After the last epoch
the reference's other map ("mul", the one the paper uses for AUPRO) and a sigma-4 blur are
evaluated too. Writes ``reports/msflow_bottle.json`` and ``.md`` with PatchCore's README row
(same backbone, same protocol) next to it.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/msflow_bottle.py            # ~25 min on 2 shared cores
    python benchmarks/msflow_bottle.py --set detector.params.lr=3e-4 --tag lr3e-4

Per-epoch seconds are training only (evaluation excluded), wall-clock on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyimgano_core.config import load_config
from pyimgano_core.data import load_splits
from pyimgano_core.detectors import create_detector
from pyimgano_core.engine import evaluate_split
from pyimgano_core.model import Model
from pyimgano_core.postprocess import AnomalyMapPostprocess
from pyimgano_core.outputs.files import write_json

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "pixel_auroc", "aupro")
# README results table, same backbone and protocol (MobileNetV2, original 900x900 masks, AUPRO@0.3)
PATCHCORE = {"config": "configs/mvtec_patchcore_mobilenet.yaml", "image_auroc": 1.000, "pixel_auroc": 0.983, "aupro": 0.947}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mvtec_msflow_mobilenet.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override key.path=value")
    ap.add_argument("--eval-at", default="1,2,3,4,6,8,10,12,15,18,21,24", help="epochs evaluated (comma list)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 wins on a loaded 2-core machine)")
    ap.add_argument("--tag", default="", help="suffix of the report file names")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / args.config, args.set)
    cfg.metrics.per_defect = False
    split = load_splits(cfg.dataset)[0]
    eval_at = {int(e) for e in args.eval_at.split(",") if e}
    rows, out = [], {"train_rss_mb": None}
    tmp = Path(tempfile.mkdtemp(prefix="msflow_bench_"))

    def evaluate(det, label: str) -> dict:
        t0 = time.perf_counter()
        report = evaluate_split(cfg, split, Model(det, AnomalyMapPostprocess(cfg.postprocess)), tmp / label)
        return {**{k: round(report["metrics"][k], 4) for k in METRICS}, "eval_s": round(time.perf_counter() - t0, 1)}

    def on_epoch(info: dict, det) -> None:
        if out["train_rss_mb"] is None:
            out["train_rss_mb"] = rss_mb()  # features cached + first epoch: the training peak
        row = {"epoch": info["epoch"], "loss": round(info["loss"], 5), "lr": info["lr"], "epoch_s": round(info["seconds"], 1),
               "train_s_cum": round(det.timing_["features_s"] + sum(h["seconds"] for h in det.history_), 1)}
        if info["epoch"] in eval_at or info["epoch"] == info["epochs"]:
            row.update(evaluate(det, f"e{info['epoch']}"))
        rows.append(row)
        print(json.dumps(row), flush=True)

    det = create_detector(cfg.detector.name, on_epoch=on_epoch, **cfg.detector_params())
    t0 = time.perf_counter()
    det.fit([s.path for s in split.train])
    fit_wall = time.perf_counter() - t0

    variants = {}
    base = det.params_
    for label, update in {"mul map": {"anomaly_map": "mul"}, "add map + blur sigma 4": {"blur_sigma": 4.0}}.items():
        det.params_ = base.model_copy(update=update)
        variants[label] = evaluate(det, label.replace(" ", "_"))
        print(label, json.dumps(variants[label]), flush=True)
    det.params_ = base

    epochs = [h["seconds"] for h in det.history_]
    final = next(r for r in reversed(rows) if "pixel_auroc" in r)
    result = {
        "config": args.config, "overrides": args.set, "params": base.model_dump(mode="json"),
        "threads": args.threads, "host": platform.node(), "torch": torch.__version__,
        "note": "2 CPU cores shared with ~7 other engineers' jobs: timings are noisy upper bounds",
        "n_train": len(split.train), "n_test": len(split.test),
        "features_s": round(det.timing_["features_s"], 1), "epoch_s_median": round(statistics.median(epochs), 1),
        "train_s_total": round(det.timing_["features_s"] + sum(epochs), 1),
        "fit_wall_s_incl_evals": round(fit_wall, 1),
        "train_peak_rss_mb": round(out["train_rss_mb"] or 0, 0), "peak_rss_mb_incl_eval": round(rss_mb(), 0),
        "final": final, "variants_final_epoch": variants, "patchcore_readme": PATCHCORE, "epochs": rows,
    }
    stem = ROOT / "reports" / f"msflow_bottle{('_' + args.tag) if args.tag else ''}"
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result))
    print(stem.with_suffix(".md").read_text())


def markdown(r: dict) -> str:
    f, pc = r["final"], r["patchcore_readme"]
    p = r["params"]
    lines = [
        f"# MSFlow on MVTec AD bottle (MobileNetV2, CPU)",
        "",
        f"`python benchmarks/msflow_bottle.py {' '.join('--set ' + s for s in r['overrides'])}`".replace("  ", " "),
        f"config `{r['config']}`: {p['image_size']} px squash, taps {', '.join(p['layers'])}, blocks {p['parallel_blocks']}, "
        f"cond {p['cond_channels']}, {p['max_epochs']} epochs, batch {p['batch_size']}, Adam lr {p['lr']:g} "
        f"(warm-up {p['lr_warmup_epochs']} from x{p['lr_warmup_from']}, x{p['lr_decay_gamma']} at {p['lr_decay_epochs']}), "
        f"{r['threads']} torch thread(s). Metrics at the original 900x900 resolution, AUPRO up to FPR 0.3.",
        f"{r['note']}.",
        "",
        "| method | image AUROC | pixel AUROC | AUPRO | fit time |",
        "|---|---|---|---|---|",
        f"| PatchCore, MobileNetV2 224 (README, `{pc['config']}`) | {pc['image_auroc']:.3f} | {pc['pixel_auroc']:.3f} | {pc['aupro']:.3f} | see README |",
        f"| MSFlow, MobileNetV2 {p['image_size']}, epoch {f['epoch']} ('{p['anomaly_map']}' map) | {f['image_auroc']:.3f} | "
        f"{f['pixel_auroc']:.3f} | {f['aupro']:.3f} | {r['train_s_total'] / 60:.1f} min ({r['epoch_s_median']:.1f} s/epoch median, "
        f"features {r['features_s']:.0f} s) |",
    ]
    for label, v in r["variants_final_epoch"].items():
        lines.append(f"| same, {label} | {v['image_auroc']:.3f} | {v['pixel_auroc']:.3f} | {v['aupro']:.3f} | same model |")
    lines += [
        "",
        f"Peak RSS: {r['train_peak_rss_mb']:.0f} MB while training (cached features + first epoch), "
        f"{r['peak_rss_mb_incl_eval']:.0f} MB including evaluation at 900x900.",
        "",
        "| epoch | loss (nats/dim) | lr | epoch s | train s (cum.) | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["epochs"]:
        m = [f"{row[k]:.3f}" if k in row else "" for k in METRICS]
        lines.append(f"| {row['epoch']} | {row['loss']:.4f} | {row['lr']:.2e} | {row['epoch_s']} | {row['train_s_cum']} | {' | '.join(m)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
