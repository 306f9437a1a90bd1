"""AnomalyDINO full-shot and few-shot accuracy on one category, several seeds per few-shot setting.

Each setting is one ``pyimgano eval`` run of the config (the engine's own metrics at the
original mask resolution) with ``--set dataset.shots=k --set seed=s`` overrides; few-shot
settings are repeated over seeds and summarised as mean, sample std, min and max.

    python benchmarks/anomalydino_fewshot.py                        # MobileNetV2 stand-in, ../shared bottle
    python benchmarks/anomalydino_fewshot.py --shots 1 4 --seeds 0 1 2 --rotation both
    python benchmarks/anomalydino_fewshot.py --config configs/mvtec_anomalydino.yaml --set dataset.category=bottle
    python benchmarks/anomalydino_fewshot.py --shots 1 4 --rotation off --set detector.params.image_size=448 \
        --include reports/anomalydino_bottle.json      # add a setting to an earlier table

Writes ``<out>.json`` (every run, with timings and protocol) and ``<out>.md`` (a table).
Run from the project root (config paths are relative to it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pyimgano_core.config import load_config
from pyimgano_core.outputs.files import write_json
from pyimgano_core.outputs.report.versions import versions
from pyimgano_core.runs import eval_run

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def run_one(config: str, overrides: list[str], shots: int, seed: int, rotation: bool, tmp: Path, label: str) -> dict:
    sets = overrides + [f"seed={seed}", f"detector.params.rotation={str(rotation).lower()}"]
    if shots > 0:
        sets.append(f"dataset.shots={shots}")
    cfg = load_config(config, sets)
    t0 = time.perf_counter()
    summary = eval_run(cfg, out_root=tmp / f"k{shots}_s{seed}_r{int(rotation)}")
    (category, result), = summary["categories"].items()
    t = result["timing"]
    return {
        "label": label, "shots": shots or "full", "seed": seed, "rotation": rotation, "category": category, "set": sets,
        "metrics": {k: result["metrics"].get(k) for k in METRICS},
        "n_fit_images": result["counts"]["fit"],
        "fit_s": t.get("fit_s"), "predict_s_per_image": t.get("predict_s_per_image"), "wall_s": time.perf_counter() - t0,
        "fit_detail": t.get("fit_detail"), "peak_rss_mb": t.get("peak_rss_mb"),
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["label"], r["shots"], r["rotation"]) for r in runs):
        group = [r for r in runs if (r["label"], r["shots"], r["rotation"]) == key]
        row = {"label": key[0], "shots": key[1], "rotation": key[2], "seeds": [r["seed"] for r in group]}
        for m in METRICS:
            v = np.array([r["metrics"][m] for r in group], dtype=float)
            row[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "min": float(v.min()), "max": float(v.max())}
        row["fit_s_mean"] = float(np.mean([r["fit_s"] for r in group]))
        row["predict_s_per_image_mean"] = float(np.mean([r["predict_s_per_image"] for r in group]))
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    lines = [f"# AnomalyDINO few-shot: {doc['category']} ({doc['backbone']})", "",
             *(f"Command: `{c}`" for c in doc["commands"]), "",
             f"Protocol: {doc['protocol_note']}", "",
             "| setting | shots | rotation | seeds | image AUROC | pixel AUROC | AUPRO (0.3) | image AP | pixel AP | fit s | predict s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(s):
        return f"{s['mean']:.4f}" if s["std"] == 0 and s["min"] == s["max"] else f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"

    for r in doc["summary"]:
        lines.append(f"| {r['label']} | {r['shots']} | {'8 rotations' if r['rotation'] else 'no'} | {len(r['seeds'])} | "
                     + " | ".join(cell(r[m]) for m in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"))
                     + f" | {r['fit_s_mean']:.1f} | {r['predict_s_per_image_mean']:.3f} |")
    lines += ["", "mean ± sample std [min, max] over seeds; few-shot images chosen by `dataset.shots` with the seed "
              "(`dataset.shots_protocol`: the reference's sorted slice unless the run set `random`).",
              f"Machine: {doc['versions']['platform']}, torch {doc['versions']['torch']}; times are wall-clock on a shared machine.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mvtec_anomalydino_mobilenet.yaml")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4], help="0 = full-shot (all training images)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of few-shot settings (full-shot: the first)")
    ap.add_argument("--rotation", choices=["config", "off", "on", "both"], default="both",
                    help="rotation augmentation of few-shot references (full-shot: as the config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value")
    ap.add_argument("--out", default="reports/anomalydino_bottle", help="output stem (.json and .md)")
    ap.add_argument("--label", help="name of this setting in the table (default: '<backbone>, <image_size> px')")
    ap.add_argument("--include", type=Path, help="a JSON written earlier by this script: its runs are kept in the output")
    args = ap.parse_args(argv)

    base = load_config(args.config, args.overrides)
    cfg_rotation = bool(base.detector.params.get("rotation", False))
    few_rot = {"config": [cfg_rotation], "off": [False], "on": [True], "both": [False, True]}[args.rotation]
    label = args.label or f"{base.detector.params.get('backbone')}, {base.detector.params.get('image_size')} px"
    prior = json.loads(args.include.read_text()) if args.include else {"runs": [], "commands": []}
    for r in prior["runs"]:
        r.setdefault("label", f"{prior['backbone']}, {prior['params']['image_size']} px")
    runs = list(prior["runs"])
    with tempfile.TemporaryDirectory(prefix="anomalydino_bench_") as tmp:
        for shots in args.shots:
            for rotation in ([cfg_rotation] if shots == 0 else few_rot):
                for seed in (args.seeds[:1] if shots == 0 else args.seeds):
                    r = run_one(args.config, args.overrides, shots, seed, rotation, Path(tmp), label)
                    runs.append(r)
                    m = r["metrics"]
                    print(f"shots={r['shots']} rot={rotation} seed={seed}: image AUROC {m['image_auroc']:.4f}, pixel AUROC "
                          f"{m['pixel_auroc']:.4f}, AUPRO {m['aupro']:.4f} (fit {r['fit_s']:.1f} s, {r['wall_s']:.0f} s)", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    earlier = prior.get("commands") or ([prior["command"]] if "command" in prior else [])
    doc = {
        "commands": [*earlier, command],
        "config": args.config, "category": runs[0]["category"], "backbone": base.detector.params.get("backbone"),
        "detector": base.detector.name, "params": base.detector.params,
        "protocol_note": ("engine metrics at the original mask resolution (900x900 for bottle), AUPRO to FPR 0.3, "
                          "model input = shorter side resized then cropped to the embedder's patch multiple"),
        "summary": summarise(runs), "runs": runs, "versions": versions(),
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), doc)
    tmp_md = out.with_suffix(".md.tmp")
    tmp_md.write_text(markdown(doc))
    os.replace(tmp_md, out.with_suffix(".md"))  # atomic, like write_json
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
