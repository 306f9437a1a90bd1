"""``pyimgano compare RUN_A RUN_B``: per category and metric, B - A, and the regressions.

All headline metrics are higher-is-better. A regression is B below A by more than the
tolerance, a metric A has and B lost, or a category A has and B lacks. The mean row is
over the categories both runs have (the runs' own means may cover other sets).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import DataError
from . import METRIC_NAMES


def load_metrics(path: Path) -> dict[str, dict]:
    """{category: metrics} of a run folder (summary.json) or of one category folder (report.json)."""
    path = Path(path)
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        if summary.get("command") != "eval":
            raise DataError(f"{path}/summary.json was written by 'pyimgano {summary.get('command')}'; compare needs eval runs")
        return {c: r.get("metrics") or {} for c, r in summary["categories"].items()}
    if (path / "report.json").is_file():
        report = json.loads((path / "report.json").read_text())
        return {report["category"]: report.get("metrics") or {}}
    raise DataError(f"{path}: no summary.json or report.json (give a run folder or a category folder written by 'pyimgano eval')")


def _status(a, b, tolerance: float) -> tuple[float | None, str]:
    if a is None and b is None:
        return None, "undefined"
    if a is None:
        return None, "new"
    if b is None:
        return None, "regression"
    diff = b - a
    return diff, "regression" if diff < -tolerance else "improved" if diff > tolerance else "ok"


def compare_runs(run_a: Path, run_b: Path, tolerance: float = 0.005) -> dict:
    a, b = load_metrics(run_a), load_metrics(run_b)
    rows = []
    common = [c for c in a if c in b]
    for cat in common:
        for key in METRIC_NAMES:
            diff, status = _status(a[cat].get(key), b[cat].get(key), tolerance)
            rows.append({"category": cat, "metric": key, "a": a[cat].get(key), "b": b[cat].get(key), "diff": diff, "status": status})
    if len(common) > 1:
        for key in METRIC_NAMES:
            va = [a[c].get(key) for c in common]
            vb = [b[c].get(key) for c in common]
            both = [(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
            ma = float(np.mean([x for x, _ in both])) if both else None
            mb = float(np.mean([y for _, y in both])) if both else None
            diff, status = _status(ma, mb, tolerance)
            rows.append({"category": "mean", "metric": key, "a": ma, "b": mb, "diff": diff, "status": status})
    missing = [c for c in a if c not in b]
    for cat in missing:
        rows.append({"category": cat, "metric": None, "a": None, "b": None, "diff": None, "status": "regression",
                     "why": "category missing in B"})
    regressions = [r for r in rows if r["status"] == "regression"]
    return {"a": str(run_a), "b": str(run_b), "tolerance": tolerance, "rows": rows,
            "only_in_b": [c for c in b if c not in a], "n_regressions": len(regressions), "regressed": bool(regressions)}
