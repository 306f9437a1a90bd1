"""What the HTML report costs: bottle eval with ``output.html`` true vs false, back to back.

    python benchmarks/bench_report_overhead.py [--config configs/mvtec_patchcore_mobilenet.yaml] [--repeats 2]
        [--model MODEL_DIR]   # also/instead: eval a saved model (no fit: a harsher ratio)

Runs ``python -m pyimgano_cli eval`` in a subprocess per measurement, alternating the two
settings, and reports medians of the wall times, their ratio, and inside the html runs the
collector's own seconds (``timing.report_collect_s``) and the page build (``pyimgano report``
alone). With ``--screenshot PNG`` the last html page is opened in headless Chromium and saved.
Writes ``reports/report_overhead.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _eval(config: str, out: Path, html: bool, model: str | None) -> float:
    cmd = [sys.executable, "-m", "pyimgano_cli", "eval", config, "--out", str(out), "-q", "--set", f"output.html={str(html).lower()}"]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mvtec_patchcore_mobilenet.yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--out", default=str(ROOT / "reports" / "report_overhead"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyimgano-bench-") as tmp:
        for r in range(args.repeats):
            for html in ((True, False) if r % 2 == 0 else (False, True)):
                out = Path(tmp) / f"{r}_{html}"
                wall = _eval(args.config, out, html, args.model)
                run = next(p for p in out.iterdir() if p.is_dir())
                cat = next(p for p in run.iterdir() if (p / "report.json").is_file())
                timing = json.loads((cat / "report.json").read_text())["timing"]
                row = {"repeat": r, "html": html, "wall_s": wall, "report_collect_s": timing.get("report_collect_s"),
                       "fit_s": timing.get("fit_s"), "predict_s": timing.get("predict_s"), "metrics_s": timing.get("metrics_s")}
                if html:
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "pyimgano_cli", "report", str(cat)], check=True, cwd=ROOT,
                                   stdout=subprocess.DEVNULL)
                    row["page_rebuild_s"] = time.perf_counter() - t0
                    row["page_kb"] = (cat / "report.html").stat().st_size / 1024
                    last_page = cat / "report.html"
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.screenshot:
            sys.path.insert(0, str(ROOT))
            from tests.browser import open_page

            res = open_page(last_page.as_uri())
            Path(args.screenshot).write_bytes(res.screenshot)
            keep = Path(args.screenshot).with_suffix("")  # the page and its report, next to the screenshot
            keep.mkdir(exist_ok=True)
            for name in ("report.html", "report.json", "predictions.jsonl"):
                (keep / name).write_bytes((last_page.parent / name).read_bytes())
            print(f"screenshot {args.screenshot} {res.size} errors={res.errors}")
    med = {h: statistics.median(r["wall_s"] for r in rows if r["html"] == h) for h in (True, False)}
    collect = statistics.median(r["report_collect_s"] for r in rows if r["html"])
    rebuild = statistics.median(r["page_rebuild_s"] for r in rows if r["html"])
    without_collect = statistics.median(r["wall_s"] - r["report_collect_s"] for r in rows if not r["html"])
    summary = {"config": args.config, "model": args.model, "repeats": args.repeats, "rows": rows,
               "median_wall_s": {"html": med[True], "no_html": med[False]}, "ratio_html_over_no_html": med[True] / med[False],
               "median_report_collect_s": collect,
               "ratio_html_over_no_html_minus_collector": med[True] / without_collect, "median_page_rebuild_s": rebuild,
               "note": "shared 2-core machine: wall times are noisy; the two settings alternate back to back"}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# HTML report overhead ({args.config}{', saved model' if args.model else ''})", "",
          "| setting | median wall s | runs |", "| --- | --- | --- |",
          f"| output.html: true | {med[True]:.1f} | {sum(r['html'] for r in rows)} |",
          f"| output.html: false | {med[False]:.1f} | {sum(not r['html'] for r in rows)} |", "",
          f"Ratio html / no html: **{med[True] / med[False]:.3f}**. Inside the html runs: collector "
          f"{collect:.2f} s (curves + worst-case thumbnails, during scoring), page build alone "
          f"(`pyimgano report`, incl. Python start) {rebuild:.1f} s. Counting the collector as overhead too "
          f"(it also runs with html off, for report.json's curves): ratio {med[True] / without_collect:.3f}.", "", summary["note"] + "."]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
