"""Fit at scale: N bottle-derived training images, evaluated on the real bottle test split.

    python benchmarks/bench_scale.py --n 209 1000 --ratio 0.1 [--method greedy|chunked] [--work DIR]

Training images: the 209 real ``bottle/train/good`` images, then (for N > 209) variants of them
under realistic normal variation: the bottle is seen from above and round, so a random rotation
about the image centre (any angle), a small shift (up to 2% of the side) and a mild brightness
change (x0.92-1.08). Deterministic (image i depends only on i). They are written as PNG to a
temporary work folder (default: a system temp dir; never committed; removed unless --keep).

Each N is one ``python -m pyimgano_cli eval`` process on the README PatchCore config
(MobileNetV2, 224 squash) with ``coreset.ratio`` and ``coreset.method`` set, through a manifest
(train = the N images, test = the real 83 test images with masks). Its report gives fit
seconds (features / coreset / rest), peak RSS of the whole run, and the metrics. Rows are merged
into reports/scale.json and reports/scale.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared/data/mvtec_ad/bottle"


def variant(image: np.ndarray, i: int) -> np.ndarray:
    rng = np.random.default_rng([i, 20261201])
    h, w = image.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(0, 360)), 1.0)
    rot[:, 2] += rng.uniform(-0.02, 0.02, 2) * (w, h)
    out = cv2.warpAffine(image, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(out.astype(np.float32) * rng.uniform(0.92, 1.08), 0, 255).astype(np.uint8)


def _write_variant(job: tuple[Path, Path, int]) -> None:
    src, path, i = job
    cv2.imwrite(str(path), variant(cv2.imread(str(src)), i), [cv2.IMWRITE_PNG_COMPRESSION, 1])


def build_train(work: Path, n: int) -> list[Path]:
    """The first ``n`` training images (written once, on all cores, and reused by later N)."""
    from concurrent.futures import ProcessPoolExecutor

    originals = sorted((BOTTLE / "train/good").glob("*.png"))
    out, jobs = [], []
    (work / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = originals[i % len(originals)]
        path = src if i < len(originals) else work / "train" / f"{i:05d}.png"
        if not path.exists():
            jobs.append((src, path, i))
        out.append(path)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_variant, jobs, chunksize=16))
    return out


def write_manifest(path: Path, train: list[Path]) -> None:
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["image", "split", "label", "mask", "defect_type"])
        for p in train:
            wr.writerow([p, "train", "good", "", "good"])
        for p in sorted((BOTTLE / "test").glob("*/*.png")):
            defect = p.parent.name
            mask = "" if defect == "good" else BOTTLE / "ground_truth" / defect / f"{p.stem}_mask.png"
            wr.writerow([p, "test", "good" if defect == "good" else "bad", mask, defect])


def run_one(work: Path, n: int, ratio: float, method: str, chunk_points: int) -> dict:
    train = build_train(work, n)
    manifest = work / f"manifest_{n}.csv"
    write_manifest(manifest, train)
    cfg = yaml.safe_load((REPO / "configs/mvtec_patchcore_mobilenet.yaml").read_text())
    cfg["name"] = f"scale_{n}_{ratio}_{method}_{chunk_points}"
    cfg["dataset"] = {"type": "manifest", "path": str(manifest), "category": "bottle", "allow_outside_root": True}
    cfg["detector"]["params"].update(coreset={"ratio": ratio, "method": "exact" if method == "greedy" else method, **({"chunk_points": chunk_points} if method == "chunked" else {})}, spill_dir=str(work),
                                     weights=str(REPO.parent / "shared/weights/mobilenet_v2-b0353104.pth"))
    cfg["output"] = {"root": str(work / "reports")}
    cfg_path = work / f"{cfg['name']}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pyimgano_cli", "eval", str(cfg_path), "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"N={n}: eval failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    report = json.loads((work / "reports" / cfg["name"] / "bottle" / "report.json").read_text())
    t, m = report["timing"], report["metrics"]
    d = t["fit_detail"]
    features = d.get("load_s", 0) + d.get("embed_s", 0)
    coreset = d.get("coreset_s", 0)
    return {
        "n_images": n, "coreset_ratio": ratio, "coreset_method": method,
        "chunk_points": chunk_points if method == "chunked" else None, "chunks": d.get("coreset_chunks"), "patches": d.get("spill", {}).get("rows"),
        "fit_s": round(t["fit_s"], 1), "features_s": round(features, 1), "coreset_s": round(coreset, 1),
        "rest_s": round(t["fit_s"] - features - coreset, 1), "exact_fraction": d.get("coreset_exact_fraction"),
        "expected_peak_gib": d.get("estimate", {}).get("expected_peak_gib"),
        "peak_rss_gib": round(t["peak_rss_mb"] / 1024, 2), "run_wall_s": round(wall, 1),
        "image_auroc": round(m["image_auroc"], 3), "pixel_auroc": round(m["pixel_auroc"], 3), "aupro": round(m["aupro"], 3),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
    }


def write_reports(out: Path, rows: list[dict]) -> None:
    path = out / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keyed = {(r["n_images"], r["coreset_ratio"], r["coreset_method"], r.get("chunk_points")): r for r in old + rows}
    allrows = sorted(keyed.values(), key=lambda r: (r["coreset_ratio"] < 0.05, r["n_images"], r["coreset_method"]))
    path.write_text(json.dumps(allrows, indent=1) + "\n")
    lines = ["# Fit at scale: bottle-derived training sets, real bottle test split", "",
             "`python benchmarks/bench_scale.py --n N --ratio R --method M`: README PatchCore config (MobileNetV2, 224 squash);",
             "training = the 209 real images + rotated/shifted/brightness variants; 2 shared CPU cores (load average",
             "at the end of each run given: timings are noisy, accuracy is not). Peak RSS is the whole eval process.", "",
             "| N | coreset | method (chunks) | patches | fit s | features s | coreset s | rest s | exact share | peak RSS GiB | image AUROC | pixel AUROC | AUPRO | load | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in allrows:
        tf = "-" if r.get("exact_fraction") is None else f"{r['exact_fraction']:.4f}"
        chunks = "" if r.get("chunks") in (1, None) else f" ({r['chunks']})"
        lines.append(f"| {r['n_images']} | {r['coreset_ratio']:.0%} | {r['coreset_method']}{chunks} | {r['patches']:,} | {r['fit_s']} | "
                     f"{r['features_s']} | {r['coreset_s']} | {r['rest_s']} | {tf} | {r['peak_rss_gib']} | "
                     f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['load_average_1min']} | {r.get('commit', '-')} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[209, 1000])
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--method", choices=["greedy", "chunked"], default="greedy")
    ap.add_argument("--chunk-points", type=int, default=200_000, help="coreset.chunk_points of the chunked method")
    ap.add_argument("--work", type=Path, default=None, help="folder for generated images (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated images")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pyimgano-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for n in args.n:
            row = run_one(work, n, args.ratio, args.method, args.chunk_points)
            print(json.dumps(row), flush=True)
            write_reports(args.out, [row])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
