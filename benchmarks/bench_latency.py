"""Line speed on MVTec AD bottle: per-image latency, export throughput, bounded-memory metrics.

    python benchmarks/bench_latency.py                      # from the project root, ~30-60 min shared
    python benchmarks/bench_latency.py --baseline DIR       # also time the code checked out in DIR

Sections (results in reports/latency.json + latency.md):

1. models: the README config (PatchCore, MobileNetV2, 224 squash, 10% coreset = 16k entries) and
   a ~164k-entry bank (coreset.ratio=1: all 209 x 28 x 28 training patches). The pca_ivf/ivf
   variants reuse the *same* memory bank, only the index over it is built (its build time,
   saved size and load time are reported).
2. per variant: image AUROC / pixel AUROC / AUPRO from `pyimgano eval --model` (83 test images,
   900x900 masks), recall@1 of the index against exact search on the patches of 20 test images
   (and how much the approximate distance over-estimates), and per-image latency of
   `load_model(...).predict(path)` (median, p95 of 40 calls after 3 warm-up calls; includes
   decoding the 900x900 PNG), each in a fresh process. With --baseline, the exact row is also
   timed with the old code, in the same run.
3. export-maps: a calibrated README model (10% holdout, for masks) on folders of 100 and 1000
   bottle images (symlinks), overlay + map + mask each; images/s and peak RSS (GNU time).
4. metrics: the bottle test maps/masks upscaled to 1800x1800 and repeated to >= 1 G pixels,
   through the streaming accumulator in a fresh process (peak RSS), and a subset that fits
   through both the streaming and the single-sort in-memory path (values compared).

The machine's 2 cores are shared with other jobs: compare rows of one run (ratios), not runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared/data/mvtec_ad/bottle"
CFG = ROOT / "configs/mvtec_patchcore_mobilenet.yaml"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
VARIANTS = {"exact": {}, "ivf": {"knn": {"kind": "ivf"}}, "hnsw": {"knn": {"kind": "hnsw", "ef_search": 32}},
            # coarse IVF search in 64 PCA dimensions, 16 candidates re-ranked exactly at 1024-d (knn.py)
            "pca_ivf": {"knn": {"kind": "pca_ivf"}}}


def sh(args: list[str], cwd: Path = ROOT) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB, GNU time) and stdout of a child process; raises on failure."""
    with tempfile.NamedTemporaryFile("r") as t:
        start = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *args], cwd=cwd, env=ENV, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
        return wall, int(t.read().strip().splitlines()[-1]) / 1024, out.stdout


def cli(*args, cwd: Path = ROOT) -> tuple[float, float, str]:
    return sh([sys.executable, "-m", "pyimgano_cli", *map(str, args)], cwd)


def sets(params: dict) -> list[str]:
    return [x for k, v in params.items() for x in ("--set", f"detector.params.{k}={v}")]


# ------------------------------------------------------------------------------------ models
def derive(src: Path, dst: Path, params: dict) -> dict:
    """A model over the same memory bank as ``src`` with another search index; returns costs."""
    from pyimgano_core.model import Model

    m = Model.load(src)
    det = m.detector
    new = type(det)(**{**det.params, **params})
    new.params_, new.timing_ = new.Params.model_validate(new.params), {}
    new.memory_, new.n_train_patches_ = det.memory_, det.n_train_patches_
    t0 = time.perf_counter()
    new._knn()
    build_s = time.perf_counter() - t0
    Model(new, m.postprocess, m.thresholds, m.meta).save(dst)
    t0 = time.perf_counter()
    Model.load(dst)
    load_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in dst.iterdir())
    return {"index_build_s": round(build_s, 2), "model_load_s": round(load_s, 2), "model_mib": round(size / 2**20, 1)}


def recall(exact_dir: Path, approx_dir: Path, n_images: int = 20) -> dict:
    """recall@1 of the approximate index against exact search, on real test patches."""
    import numpy as np

    from pyimgano_core.model import Model

    ex, ap = Model.load(exact_dir).detector, Model.load(approx_dir).detector
    paths = sorted(BOTTLE.glob("test/*/*.png"))[:: max(1, 83 // n_images)][:n_images]
    feats = np.concatenate([f.reshape(-1, f.shape[-1]) for f, _ in ex._embed([str(p) for p in paths], {})])
    de, ie = ex._knn().search(feats)
    da, ia = ap._knn().search(feats)
    over = da[:, 0] - de[:, 0]
    return {"recall_at_1": round(float(np.mean(ia[:, 0] == ie[:, 0])), 4), "n_queries": int(len(feats)),
            "distance_overestimate_mean": round(float(over.mean()), 4), "distance_overestimate_max": round(float(over.max()), 3),
            "mean_exact_distance": round(float(de[:, 0].mean()), 3)}


def latency_worker(model_dir: str, n: int) -> None:
    """(child) per-image latency of load_model(...).predict: from the PNG path (decoding included) and
    from the decoded HxWx3 frame (what a camera hands a server), alternating, on the same images."""
    from pyimgano_core.data.io import read_image
    from pyimgano_core.infer import load_model

    paths = sorted(BOTTLE.glob("test/*/*.png"))
    inspector = load_model(model_dir)
    for p in paths[:3]:
        inspector.predict(str(p))
    times = {"path": [], "array": [], "decode": []}
    for p in paths[3 : 3 + n]:
        t0 = time.perf_counter()
        inspector.predict(str(p))
        t1 = time.perf_counter()
        frame = read_image(p)
        t2 = time.perf_counter()
        inspector.predict(frame, channels="rgb")  # read_image decodes to RGB
        times["path"].append(t1 - t0), times["decode"].append(t2 - t1), times["array"].append(time.perf_counter() - t2)

    def ms(v, q):
        v = sorted(v)
        return round(1000 * (statistics.median(v) if q == 50 else v[int(round(0.95 * (len(v) - 1)))]), 1)

    print(json.dumps({"median_ms": ms(times["path"], 50), "p95_ms": ms(times["path"], 95), "array_median_ms": ms(times["array"], 50),
                      "array_p95_ms": ms(times["array"], 95), "png_decode_median_ms": ms(times["decode"], 50), "n": n}))


def latency(model_dir: Path, code: Path = ROOT, n: int = 40) -> dict:
    _, rss, out = sh([sys.executable, str(Path(__file__).resolve()), "--latency-worker", str(model_dir), str(n)], cwd=code)
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": round(rss)}


def evaluate(run_dir: Path, params: dict, out: Path, extra: list[str] = ()) -> dict:
    wall, rss, _ = cli("eval", CFG, "--model", run_dir, *extra, *sets(params), "--out", out, "-q")
    rep = json.loads(next(out.rglob("report.json")).read_text())
    m = rep["metrics"]
    # 6 decimals: the Markdown prints 4 (rounding 0.98249 to 4 and then to 3 decimals read 0.983)
    return {"image_auroc": round(m["image_auroc"], 6), "pixel_auroc": round(m["pixel_auroc"], 6), "aupro": round(m["aupro"], 6),
            "eval_predict_s_per_image": round(rep["timing"]["predict_s_per_image"], 4), "eval_wall_s": round(wall, 1),
            "eval_peak_rss_mib": round(rss)}


def bank_rows(work: Path, label: str, extra: list[str], baseline: Path | None, fitted: Path | None,
              variants: list[str], n_latency: int) -> dict:
    """Rows of one memory bank; ``fitted``: an exact run folder fitted earlier with the same settings."""
    base = work / label
    fit_s = fit_rss = None
    if fitted is None:
        fit_s, fit_rss, _ = cli("fit", CFG, *extra, "--out", base / "exact", "-q")
    else:
        (base / "exact").mkdir(parents=True)
        (base / "exact/mvtec_patchcore_mobilenet").symlink_to(fitted.resolve())
    exact_model = base / "exact/mvtec_patchcore_mobilenet/bottle/model"
    rows = {}
    for name in variants:
        params = VARIANTS[name]
        run = base / name / "mvtec_patchcore_mobilenet"
        model = run / "bottle/model"
        row = {"params": params}
        if params:
            row.update(derive(exact_model, model, params))
            row.update(recall(exact_model, model))
        row.update(evaluate(run, params, work / f"eval_{label}_{name}", extra))
        row["latency"] = latency(model, n=n_latency)
        if name == "exact" and baseline is not None:  # the old code cannot read this model's backbone layout: its own fit
            cli("fit", CFG, *extra, "--out", base / "exact_baseline", "-q", cwd=baseline)
            row["latency_baseline_code"] = latency(base / "exact_baseline/mvtec_patchcore_mobilenet/bottle/model", baseline, n=n_latency)
        rows[name] = row
        print(label, name, json.dumps(row), flush=True)
    from pyimgano_core.model import Model

    return {"fit_s": fit_s and round(fit_s, 1), "fit_peak_rss_mib": fit_rss and round(fit_rss), "memory_entries": int(len(Model.load(exact_model).detector.memory_)),
            "rows": rows}


# ------------------------------------------------------------------------------------ export
def export_rows(work: Path, baseline: Path | None, fitted: Path | None) -> dict:
    run = work / "calibrated/exact/mvtec_patchcore_mobilenet"
    if fitted is None:
        cli("fit", CFG, "--set", "calibration.holdout_fraction=0.1", "--out", run.parent, "-q")
    else:
        run.parent.mkdir(parents=True)
        run.symlink_to(fitted.resolve())
    derive(run / "bottle/model", work / "calibrated/pca_ivf/mvtec_patchcore_mobilenet/bottle/model", VARIANTS["pca_ivf"])
    sources = sorted(BOTTLE.glob("test/*/*.png")) + sorted(BOTTLE.glob("train/good/*.png"))
    out = {}
    jobs = [("pca_ivf", 100, ROOT), ("pca_ivf", 1000, ROOT), ("exact", 100, ROOT)]
    for name, n, code in jobs:
        folder = work / f"in{n}"
        if not folder.exists():
            folder.mkdir()
            for i in range(n):
                (folder / f"{i:04d}.png").symlink_to(sources[i % len(sources)])
        dst = work / f"export_{name}_{n}_{'base' if code != ROOT else 'new'}"
        wall, rss, _ = cli("export-maps", CFG, "--model", work / f"calibrated/{name}/mvtec_patchcore_mobilenet", *sets(VARIANTS[name]),
                           "--input", folder, "--out", dst, "-q", cwd=code)
        summary = json.loads(next(dst.rglob("export/summary.json")).read_text())
        key = f"{name}_{n}" + ("_baseline_code" if code != ROOT else "")
        out[key] = {"images": n, "wall_s": round(wall, 1), "images_per_s_engine": round(summary["images_per_s"], 2),
                    "images_per_s_wall": round(n / wall, 2), "peak_rss_mib": round(rss), "n_failed": summary["n_failed"]}
        print("export", key, json.dumps(out[key]), flush=True)
    return out


# ------------------------------------------------------------------------------------ metrics
def dump_test_maps(run: Path, path: Path) -> None:
    """The README model's bottle test maps (900x900, float32) and masks, to one .npz."""
    import numpy as np

    from pyimgano_core.data.io import read_mask
    from pyimgano_core.engine import score_stream
    from pyimgano_core.infer import load_model

    model = load_model(run / "bottle/model").model
    paths = sorted(BOTTLE.glob("test/*/*.png"))
    maps, masks, groups = [], [], []
    for s in score_stream(model, paths):
        p = paths[s.index]
        gt = BOTTLE / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        masks.append(read_mask(gt, 0) if gt.exists() else np.zeros(s.orig_hw, bool))
        maps.append(s.amap.astype(np.float16))  # half the file; both paths below read the same values
        groups.append(p.parent.name)
    np.savez(path, maps=np.stack(maps), masks=np.stack(masks), groups=np.array(groups))


def _load(npz: Path) -> tuple:
    import numpy as np

    with np.load(npz) as z:
        return z["maps"], z["masks"], z["groups"]


def _upscaled(test: tuple, side: int):
    """The test maps/masks of ``_load`` resized to side x side, one at a time."""
    import cv2
    import numpy as np

    for m, g, d in zip(*test):
        yield (cv2.resize(g.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST).astype(bool),
               cv2.resize(m.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR), str(d))


def metrics_worker(npz: str, mode: str, pixels: int, side: int) -> None:
    """(child) stream: >= ``pixels`` pixels through PixelMetricStream; subset: both paths."""
    import numpy as np

    from pyimgano_core.metrics import pixel_metrics
    from pyimgano_core.metrics_stream import PixelMetricStream

    t0 = time.perf_counter()
    res, test = {}, _load(Path(npz))  # loaded once (~0.2 GiB of float16 maps and masks, counted in the peak)
    with PixelMetricStream() as acc:
        if mode == "stream":
            while acc_pixels(acc) < pixels:
                for gt, amap, d in _upscaled(test, side):
                    acc.add(gt, amap, d)
        else:
            subset = [x for i, x in enumerate(_upscaled(test, side)) if i % (83 // 8) == 0][:8]
            for gt, amap, d in subset:
                acc.add(gt, amap, d)
            ref = pixel_metrics([s[0] for s in subset], [s[1] for s in subset], 0.3)
            res["in_memory"] = ref
        t1 = time.perf_counter()
        res.update(acc.metrics(0.3))
        res["per_defect"] = {d: acc.metrics(0.3, {"good", d}) for d in ("broken_large", "broken_small", "contamination")
                             if mode == "stream"}
        res["pixel_f1_max"] = acc.f1_max()[0]
        res.update(n_images=len(acc), n_pixels=acc_pixels(acc), add_s=round(t1 - t0, 1), metrics_s=round(time.perf_counter() - t1, 1))
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(res))


def acc_pixels(acc) -> int:
    return sum(acc._pixels.values())


def metrics_rows(work: Path, readme_run: Path) -> dict:
    npz = work / "test_maps.npz"
    dump_test_maps(readme_run, npz)
    out = {}
    for mode, pixels in (("stream", 10**9), ("subset", 0)):
        wall, rss, stdout = sh([sys.executable, str(Path(__file__).resolve()), "--metrics-worker", str(npz), mode, str(pixels), "1800"])
        out[mode] = {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": round(wall, 1), "gnu_time_peak_rss_mib": round(rss)}
        print("metrics", mode, json.dumps(out[mode]), flush=True)
    sub = out["subset"]
    out["subset_max_abs_difference"] = max(abs(sub[k] - sub["in_memory"][k]) for k in ("pixel_auroc", "pixel_ap", "aupro"))
    return out


# ------------------------------------------------------------------------------------ report
def write_markdown(res: dict, path: Path) -> None:
    lines = ["# Line speed on bottle (benchmarks/bench_latency.py)", "",
             f"Machine: {res['machine']}. Compare rows of one run (the host's speed drifts), not runs.",
             "Latency = `load_model(...).predict` per image, median / p95 over 30 (bank164k: 15) test images: from the PNG path "
             "(decoding the 900x900 PNG included) and from the decoded frame (model + search + map at 900x900); "
             "accuracy from `pyimgano eval` on the 83 test images.", ""]
    for bank in ("readme", "bank164k"):
        if bank not in res:
            continue
        b = res[bank]
        lines += [f"## {bank}: {b['memory_entries']} memory entries", "",
                  "| index | predict(frame) median ms | p95 ms | predict(path) median ms | p95 ms | image AUROC | pixel AUROC | AUPRO | recall@1 | index build s | model load s | model MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in b["rows"].items():
            lat = r["latency"]
            lines.append(f"| {name} {r['params'] or ''} | {lat.get('array_median_ms', '-')} | {lat.get('array_p95_ms', '-')} | "
                         f"{lat['median_ms']} | {lat['p95_ms']} | {r['image_auroc']:.4f} | "
                         f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r.get('recall_at_1', 1.0)} | {r.get('index_build_s', '-')} | "
                         f"{r.get('model_load_s', '-')} | {r.get('model_mib', '-')} |")
            if "latency_baseline_code" in r:
                lb = r["latency_baseline_code"]
                lines.append(f"| exact, code before this change | {lb.get('array_median_ms', '-')} | {lb.get('array_p95_ms', '-')} | "
                             f"{lb['median_ms']} | {lb['p95_ms']} | | | | | | | |")
        lines.append("")
    if "export" in res:
        lines += ["## export-maps (overlay + map + mask per image)", "", "| run | images | images/s (engine) | images/s (wall) | peak RSS MiB |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['images']} | {v['images_per_s_engine']} | {v['images_per_s_wall']} | {v['peak_rss_mib']} |" for k, v in res["export"].items()]
        lines.append("")
    if "metrics" in res:
        s, sub = res["metrics"]["stream"], res["metrics"]["subset"]
        lines += ["## pixel metrics in bounded memory", "",
                  f"- {s['n_images']} maps of 1800x1800 = {s['n_pixels'] / 1e9:.2f} G pixels: peak RSS {s['peak_rss_mib']} MiB, "
                  f"add {s['add_s']} s + metrics {s['metrics_s']} s; pixel AUROC {s['pixel_auroc']:.4f}, AUPRO {s['aupro']:.4f}.",
                  f"- subset of {sub['n_images']} maps: streaming vs single-sort in-memory, max |difference| = "
                  f"{res['metrics']['subset_max_abs_difference']:.1e}.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, help="checkout of the code to compare the exact path with")
    ap.add_argument("--only", nargs="*", default=["readme", "bank164k", "export", "metrics"])
    ap.add_argument("--readme-run", type=Path, help="an exact README-config run folder fitted earlier (skips that fit)")
    ap.add_argument("--calibrated-run", type=Path, help="same with calibration.holdout_fraction=0.1 (export)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/latency.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyimgano_latency_"))
    out_json = args.out
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res["machine"] = "2 CPU cores; with other jobs paused unless said otherwise"
    if "readme" in args.only:
        res["readme"] = bank_rows(work, "readme", [], args.baseline, args.readme_run, ["exact", "pca_ivf", "ivf"], 30)
    if "bank164k" in args.only:
        res["bank164k"] = bank_rows(work, "bank164k", ["--set", "detector.params.coreset.ratio=1.0"], None, None, ["exact", "pca_ivf"], 15)
    if "export" in args.only:
        res["export"] = export_rows(work, args.baseline, args.calibrated_run)
    if "metrics" in args.only:
        readme = args.readme_run or work / "readme/exact/mvtec_patchcore_mobilenet"
        if not readme.exists():
            cli("fit", CFG, "--out", readme.parent, "-q")
        res["metrics"] = metrics_rows(work, readme)
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, out_json.with_suffix(".md"))
    print(f"written {out_json}; scratch in {work}")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # workers import the code of the checkout they run in
    if len(sys.argv) > 1 and sys.argv[1] == "--latency-worker":
        latency_worker(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--metrics-worker":
        metrics_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
