"""Report pages and CI gates, built from what the engine wrote (``report.json`` and its assets).

    collect.py   what the page needs, gathered during the one scoring pass (curves, worst cases)
    curves.py    ROC / PR / PRO curve points (exact, downsampled) for report.json
    plots.py     matplotlib (Agg) figures
    html.py      report.html per category, from saved files only
    summary.py   summary.md and index.html over the categories of a run
    gates.py     --fail-under metric=value checks
    compare.py   metric differences between two runs, regressions beyond a tolerance
    rebuild.py   `pyimgano report RUN_DIR`: the pages again, from saved files
    versions.py  the library versions a report records

Nothing here scores images: the engine stays the one place that does.
"""
from __future__ import annotations

# The headline metrics, in the papers' column order (runs.METRIC_KEYS holds the same keys).
METRIC_NAMES = {"image_auroc": "image AUROC", "image_ap": "image AP", "pixel_auroc": "pixel AUROC",
                "pixel_ap": "pixel AP", "aupro": "AUPRO"}
GATE_EXIT_CODE = 6  # a quality gate failed: --fail-under fell short, or compare found a regression
