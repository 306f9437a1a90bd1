"""PatchCore vs SoftPatch on MVTec AD bottle (MobileNetV2, offline), clean and 10% contaminated.

Runs ``pyimgano eval`` (``pyimgano_core.runs.eval_run``) four times, one after the other:
{patchcore, softpatch} x {clean, dataset.contamination = {ratio: 0.1, seed: 0, overlap: false}}
with configs/mvtec_patchcore_mobilenet.yaml and configs/mvtec_softpatch_mobilenet.yaml, and
writes reports/softpatch_comparison.json and .md (a table to paste into the README), with the
targets checked and fit time split into embedding, noise scoring and coreset.

    python benchmarks/compare_softpatch.py                       # ~10 min on 2 cores
    python benchmarks/compare_softpatch.py --set threshold=0.1 --tag thr01 --only softpatch/noisy10
    python benchmarks/compare_softpatch.py --set-all coreset.ratio=0.01 --tag coreset1pct

Also reports, for SoftPatch on the contaminated set, how many patches of the moved images'
defect regions were excluded from the coreset candidates (the denoising's recall).
Timings are wall-clock on a shared machine: compare ratios within one run of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from pyimgano_core import runs
from pyimgano_core.config import load_config
from pyimgano_core.data import load_splits
from pyimgano_core.data.io import read_mask
from pyimgano_core.data.types import Split
from pyimgano_core.engine import build_model, evaluate_split
from pyimgano_core.outputs.files import write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"patchcore": "configs/mvtec_patchcore_mobilenet.yaml", "softpatch": "configs/mvtec_softpatch_mobilenet.yaml"}
SETTINGS = {"clean": [], "noisy10": ["dataset.contamination.ratio=0.1", "dataset.contamination.seed=0",
                                     "dataset.contamination.overlap=false"]}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def denoising_recall(model, split) -> dict | None:
    """Share of the moved (defective) training images' defect patches that SoftPatch excluded.

    A grid cell counts as a defect patch when at least half of its area is defect in the mask
    (mask squashed to the model input, then area-averaged to the patch grid).
    """
    det = model.detector
    scores = getattr(det, "train_outlier_scores_", None)
    moved = set((split.notes.get("contamination") or {}).get("moved", []))
    if scores is None or not moved:
        return None
    root = Path(split.notes.get("root", "."))
    excluded = scores > det.outlier_cutoff_
    n_defect = n_defect_excluded = 0
    for i, s in enumerate(split.train):
        if s.mask_path is None or Path(s.path).relative_to(root).as_posix() not in moved:
            continue
        m = read_mask(s.mask_path, split.mask_threshold).astype(np.float32)
        grid = cv2.resize(m, scores.shape[:0:-1], interpolation=cv2.INTER_AREA) >= 0.5
        n_defect += int(grid.sum())
        n_defect_excluded += int((grid & excluded[i]).sum())
    return {"defect_patches_in_moved_images": n_defect, "excluded": n_defect_excluded,
            "recall": n_defect_excluded / n_defect if n_defect else None,
            "excluded_patches_total": int(excluded.sum()), "train_patches_total": int(excluded.size),
            "defect_share_of_excluded": n_defect_excluded / max(int(excluded.sum()), 1)}


def run_one(detector: str, setting: str, extra: list[str], out_root: Path, common: list[str] = ()) -> dict:
    params = list(common) + (extra if detector == "softpatch" else [])
    overrides = SETTINGS[setting] + [f"detector.params.{kv}" for kv in params]
    cfg = load_config(ROOT / CONFIGS[detector], overrides)
    cfg.name = f"{cfg.name}_{setting}"
    captured = {}

    def build_and_keep(cfg_, split, progress=None):  # eval_run's own fit, keeping the model for diagnostics
        model, timing = build_model(cfg_, split, progress)
        captured["model"], captured["split"] = model, split
        return model, timing

    runs.build_model = build_and_keep
    try:
        t0 = time.perf_counter()
        summary = runs.eval_run(cfg, out_root=out_root)
        wall = time.perf_counter() - t0
    finally:
        runs.build_model = build_model
    cat = summary["categories"]["bottle"]
    t, fd = cat["timing"], cat["timing"]["fit_detail"]
    row = {
        "detector": detector, "training": setting, "overrides": overrides,
        **{k: cat["metrics"][k] for k in METRICS},
        "fit_s": t["fit_s"], "embed_s": fd.get("embed_s", 0.0) + fd.get("load_s", 0.0),
        "noise_scoring_s": fd.get("noise_projection_s", 0.0) + fd.get("noise_scoring_s", 0.0),
        "coreset_s": fd.get("coreset_s", fd.get("memory_s")), "predict_s": t["predict_s"], "wall_s": wall,
        "fit_detail": fd, "counts": cat["counts"], "report": os.path.relpath(cat["report"], ROOT),
        "memory_size": int(len(captured["model"].detector.memory_)),
    }
    if detector == "softpatch":
        row["denoising"] = denoising_recall(captured["model"], captured["split"])
    if setting == "clean":
        row["on_noisy_test_set"] = clean_model_on_noisy_test(cfg, captured["model"], captured["split"], out_root)
    return row


def clean_model_on_noisy_test(cfg, model, clean: Split, out_root: Path) -> dict:
    """The clean-trained model scored on the noisy run's test set (moved images removed).

    With overlap false the noisy runs are tested on 63 of the 83 images, so their numbers are
    not comparable with the clean runs' 83-image numbers; this gives the like-for-like baseline.
    """
    noisy_cfg = load_config(ROOT / CONFIGS[cfg.detector.name], SETTINGS["noisy10"])
    (noisy,) = load_splits(noisy_cfg.dataset)
    split = Split(clean.name, clean.train, noisy.test, clean.mask_threshold,
                  dict(clean.notes, test_set="the noisy10 run's test set (moved images removed)"))
    report = evaluate_split(cfg, split, model, out_root / cfg.name / f"{clean.name}_on_noisy10_test")
    return {k: report["metrics"][k] for k in METRICS} | {"n_test": report["counts"]["test"]}


def check_targets(rows: dict) -> list[dict]:
    def r(d, s):
        return rows.get(f"{d}/{s}")

    checks = []
    pn, sn, pc, sc = r("patchcore", "noisy10"), r("softpatch", "noisy10"), r("patchcore", "clean"), r("softpatch", "clean")
    if pn and sn:
        for k in ("pixel_auroc", "aupro"):
            checks.append({"target": f"noisy: SoftPatch {k} > PatchCore", "value": sn[k] - pn[k], "ok": sn[k] > pn[k]})
    if sn and sc:
        for k in METRICS:
            same = sc["on_noisy_test_set"][k]
            checks.append({"target": f"SoftPatch {k}: noisy within 0.005 of clean (same 63 test images)",
                           "value": sn[k] - same, "ok": sn[k] >= same - 0.005})
            checks.append({"target": f"SoftPatch {k}: noisy within 0.005 of clean (clean on all 83 test images)",
                           "value": sn[k] - sc[k], "ok": sn[k] >= sc[k] - 0.005})
    if pc and sc:
        for k in METRICS:
            checks.append({"target": f"clean: SoftPatch {k} >= PatchCore - 0.01", "value": sc[k] - pc[k], "ok": sc[k] >= pc[k] - 0.01})
    for s in ("clean", "noisy10"):
        if r("patchcore", s) and r("softpatch", s):
            ratio = r("softpatch", s)["fit_s"] / r("patchcore", s)["fit_s"]
            checks.append({"target": f"{s}: SoftPatch fit time <= 1.5x PatchCore", "value": ratio, "ok": ratio <= 1.5})
    return checks


def markdown(result: dict) -> str:
    lines = [
        "### PatchCore vs SoftPatch, MVTec AD bottle, MobileNetV2 (offline), 2 CPU cores",
        "",
        "Training: clean = the 209 good images; noisy 10% = `dataset.contamination: {ratio: 0.1, seed: 0, overlap: false}`",
        "(20 defective test images moved into training and out of the test set, leaving 63 test images; the clean",
        "models are scored on those 63 too, for a like-for-like comparison). Same backbone",
        "settings for both (configs/mvtec_*_mobilenet.yaml): 224x224 squash, 10% coreset; SoftPatch: LOF k=6, threshold 0.15,",
        "soft weights. Pixel metrics at the original 900x900 mask resolution; AUPRO to FPR 0.3.",
        "",
        "| detector | training | test images | image AUROC | pixel AUROC | AUPRO | fit s (embed / noise scoring / coreset) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    if result["softpatch_extra"] or result["both_extra"]:
        lines[-2:-2] = [f"Overrides: both detectors {result['both_extra']}, SoftPatch {result['softpatch_extra']}.", ""]
    for row in sorted(result["runs"].values(), key=lambda r: (r["detector"], r["training"])):
        fit = f"{row['fit_s']:.0f} ({row['embed_s']:.0f} / {row['noise_scoring_s']:.1f} / {row['coreset_s']:.0f})"
        training = "clean" if row["training"] == "clean" else "noisy 10%"
        lines.append(f"| {row['detector']} | {training} | {row['counts']['test']} | {row['image_auroc']:.4f} | "
                     f"{row['pixel_auroc']:.4f} | {row['aupro']:.4f} | {fit} |")
        same = row.get("on_noisy_test_set")
        if same:
            lines.append(f"| {row['detector']} | clean | {same['n_test']} (noisy run's) | {same['image_auroc']:.4f} | "
                         f"{same['pixel_auroc']:.4f} | {same['aupro']:.4f} | (same model) |")
    den = (result["runs"].get("softpatch/noisy10") or {}).get("denoising")
    if den:
        lines += ["", f"SoftPatch on the noisy set excluded {den['excluded']} of the {den['defect_patches_in_moved_images']} "
                      f"defect patches of the moved images (recall {den['recall']:.2f}); they are "
                      f"{100 * den['defect_share_of_excluded']:.1f}% of the {den['excluded_patches_total']} excluded patches."]
    lines += ["", "Targets:", ""]
    lines += [f"- {'OK  ' if c['ok'] else 'MISS'} {c['target']}: {c['value']:+.4f}" if "time" not in c["target"]
              else f"- {'OK  ' if c['ok'] else 'MISS'} {c['target']}: {c['value']:.2f}x" for c in result["targets"]]
    lines += ["", f"Measured {result['date']} on {result['machine']}; wall-clock times on a shared machine (load average "
                  f"{result['load_before']} before, {result['load_after']} after): compare ratios within this run.", ""]
    return "\n".join(lines)


def collect_ablations(out_root: Path) -> None:
    """Append the ablation runs found under ``out_root`` to the committed comparison (JSON + Markdown)."""
    main_json = ROOT / "reports" / "softpatch_comparison.json"
    result = json.loads(main_json.read_text())
    result["ablations"] = {}
    lines = ["", "Ablations (same data and protocol; the like-for-like baseline is each detector's clean model on the",
             "63 test images of the noisy run):", "",
             "| ablation | detector | training | image AUROC | pixel AUROC | AUPRO | excluded defect patches |",
             "|---|---|---|---:|---:|---:|---:|"]
    for path in sorted(out_root.glob("softpatch_comparison_*.json")):
        tag = path.stem.removeprefix("softpatch_comparison_")
        abl = json.loads(path.read_text())
        result["ablations"][tag] = {"softpatch_extra": abl["softpatch_extra"], "both_extra": abl["both_extra"],
                                    "runs": {k: {m: v[m] for m in (*METRICS, "fit_s", "denoising", "on_noisy_test_set") if m in v}
                                             for k, v in abl["runs"].items()}}
        label = ", ".join(abl["both_extra"] + abl["softpatch_extra"])
        for key, row in sorted(abl["runs"].items()):
            den = row.get("denoising") or {}
            rec = f"{den['excluded']}/{den['defect_patches_in_moved_images']}" if den.get("recall") is not None else ""
            same = row.get("on_noisy_test_set")
            m = same if same else row
            training = "clean (63 test images)" if same else ("clean" if row["training"] == "clean" else "noisy 10%")
            lines.append(f"| {label} | {row['detector']} | {training} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | "
                         f"{m['aupro']:.4f} | {rec} |")
    lines += ["", "Cost of the 10% contamination, like for like (noisy model minus clean model, same 63 test images):", ""]
    for tag, runs_ in [("coreset.ratio=0.1 (main table)", result["runs"])] + [
            (", ".join(a["both_extra"] + a["softpatch_extra"]), a["runs"]) for a in result["ablations"].values()]:
        for det in CONFIGS:
            clean, noisy = runs_.get(f"{det}/clean"), runs_.get(f"{det}/noisy10")
            if clean and noisy and clean.get("on_noisy_test_set"):
                d = {k: noisy[k] - clean["on_noisy_test_set"][k] for k in METRICS}
                lines.append(f"- {tag}, {det}: image {d['image_auroc']:+.4f}, pixel {d['pixel_auroc']:+.4f}, AUPRO {d['aupro']:+.4f}")
    write_json(main_json, result)
    md = ROOT / "reports" / "softpatch_comparison.md"
    text = md.read_text().split("\nAblations (")[0].rstrip("\n") + "\n"
    md.write_text(text + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra SoftPatch param, e.g. threshold=0.1")
    ap.add_argument("--set-all", dest="common", action="append", default=[], help="param for both, e.g. coreset.ratio=0.01")
    ap.add_argument("--only", action="append", default=[], help="run only detector/setting, e.g. softpatch/noisy10")
    ap.add_argument("--tag", default="", help="ablation name: results go to <out-root>/softpatch_comparison_<tag>.*")
    ap.add_argument("--out-root", type=Path, default=ROOT / "reports" / "bench_softpatch", help="eval run folders")
    ap.add_argument("--collect", action="store_true", help="only append the ablations found under --out-root to the report")
    args = ap.parse_args()
    if args.collect:
        return collect_ablations(args.out_root)
    os.chdir(ROOT)  # configs name ../shared relative to the project root
    # only the default comparison is a committed summary; ablations stay with the run folders
    dest = args.out_root / f"softpatch_comparison_{args.tag}" if args.tag else ROOT / "reports" / "softpatch_comparison"
    dest.parent.mkdir(parents=True, exist_ok=True)
    runs_root = args.out_root / args.tag if args.tag else args.out_root
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_before": round(os.getloadavg()[0], 1), "softpatch_extra": args.extra, "both_extra": args.common, "runs": {}}
    for setting in SETTINGS:
        for detector in CONFIGS:
            key = f"{detector}/{setting}"
            if args.only and key not in args.only:
                continue
            result["runs"][key] = run_one(detector, setting, args.extra, runs_root, args.common)
            r = result["runs"][key]
            print(f"{key}: image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f} aupro {r['aupro']:.4f} "
                  f"fit {r['fit_s']:.0f}s (embed {r['embed_s']:.0f}, noise {r['noise_scoring_s']:.1f}, coreset {r['coreset_s']:.0f})",
                  flush=True)
            write_json(dest.with_suffix(".json"), result)  # partial results survive an interruption
    result["load_after"] = round(os.getloadavg()[0], 1)
    result["targets"] = check_targets(result["runs"])
    write_json(dest.with_suffix(".json"), result)
    dest.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
