"""The one writing side: every file pyimgano writes goes through this package.

    files.py        checks before work, atomic writes under our own temp names, folder locks, strict JSON
    pictures.py     anomaly-map pictures and files: overlays on one colour scale per model, map / mask files
    predictions.py  export-maps: per-image files, predictions.jsonl, summary.json, the second-export rule
    report/         report.html, curves, worst cases, summaries over categories, gates and compare

The engine decides what to write (scores, metrics, report content); these modules only write it.
"""
