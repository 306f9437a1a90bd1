"""export-maps throughput and memory on bottle images (issue: inspection-server workflow).

Fits the MobileNetV2 PatchCore with a calibration holdout once, then runs
`pyimgano export-maps --model ... --input DIR` in fresh processes on folders of 100 and 1000
images (the 1000 repeat files via symlinks) and reports images/s and peak RSS of each run.

    python benchmarks/export_throughput.py            # from the project root
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared/data/mvtec_ad/bottle"
CFG = ROOT / "configs/mvtec_patchcore_mobilenet.yaml"


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process (GNU time)."""
    with tempfile.NamedTemporaryFile("r") as t:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *args], check=False, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        return wall, int(t.read().strip().splitlines()[-1]) / 1024


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pyimgano_export_"))
    subprocess.run([sys.executable, "-m", "pyimgano_cli", "fit", str(CFG), "--set", "calibration.holdout_fraction=0.1",
                    "--out", str(work / "models"), "-q"], check=True, cwd=ROOT)
    model = work / "models/mvtec_patchcore_mobilenet/bottle/model"
    sources = sorted(BOTTLE.glob("test/*/*.png")) + sorted(BOTTLE.glob("train/good/*.png"))
    results = {}
    for n in (100, 1000):
        folder = work / f"in{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:04d}.png").symlink_to(sources[i % len(sources)])
        wall, rss = run([sys.executable, "-m", "pyimgano_cli", "export-maps", str(CFG), "--model", str(model),
                         "--input", str(folder), "--out", str(work / f"out{n}"), "-q"])
        summary = json.loads((work / f"out{n}/mvtec_patchcore_mobilenet/bottle/export/summary.json").read_text())
        results[n] = {"images": n, "wall_s": round(wall, 1), "images_per_s_engine": round(summary["images_per_s"], 2),
                      "images_per_s_wall": round(n / wall, 2), "peak_rss_mib": round(rss), "n_anomalous": summary["n_anomalous"]}
        print(json.dumps(results[n]), flush=True)
    out = ROOT / "reports/export_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}; scratch outputs in {work}")


if __name__ == "__main__":
    main()
