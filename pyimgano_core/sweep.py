"""Sweeps: a grid of ``--set`` overrides expanded into runs, all run through one executor.

``--grid detector.params.coreset.ratio=0.01,0.1 --grid dataset.category=all`` makes one run per
combination, named from its overrides (``<name>__coreset.ratio-0.01__category-all``), each
writing its normal report folder ``<out>/<run>/<category>/``; one job per (run, category) goes
to the executor at once, so a cluster works on all of them together. The sweep's table goes to
``<out>/<name>-sweep/sweep.json`` and ``sweep.md``.
"""
from __future__ import annotations

import hashlib
import itertools
import re
import time
from dataclasses import replace
from pathlib import Path

from .config import ExperimentConfig, load_config
from .errors import ConfigError
from .execution import LocalExecutor, raise_failures
from .optional import require
from .outputs.report.html import CSS
from .outputs.files import write_json
from .outputs.report.summary import write_summary_pages
from .runs import METRIC_KEYS, category_jobs, check_outputs, eval_category, finish_run, finished_report, run_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c=x"]`` -> ``[("a.b", ["1", "2"]), ("c", ["x"])]`` (values split on commas)."""
    axes = []
    for text in items:
        key, sep, raw = text.partition("=")
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key.strip() or not all(values):
            raise ConfigError(f"--grid expects key.path=value1,value2,..., got {text!r}")
        if key.strip() in (k for k, _ in axes):
            raise ConfigError(f"--grid {key.strip()} is given twice; list all its values in one --grid")
        axes.append((key.strip(), values))
    if not axes:
        raise ConfigError("sweep needs at least one --grid key.path=value1,value2")
    return axes


def run_name(base: str, combo: list[tuple[str, str]], keys: list[str]) -> str:
    """Deterministic run name from the overrides: ``base__<key>-<value>__...``.

    The key is its path inside ``detector.params`` (``coreset.ratio``), else its last component,
    unless two grid keys share it; a value with characters not allowed in a name is replaced by
    a safe spelling plus a short hash of the original.
    """
    def short(k: str) -> str:
        return k.removeprefix("detector.params.") if k.startswith("detector.params.") else k.rsplit(".", 1)[-1]

    lasts = [short(k) for k in keys]
    parts = []
    for key, value in combo:
        label = short(key) if lasts.count(short(key)) == 1 else key
        safe = _UNSAFE.sub("_", value)
        if safe != value:
            safe += "-" + hashlib.sha1(value.encode()).hexdigest()[:6]
        parts.append(f"{_UNSAFE.sub('_', label)}-{safe}")
    return "__".join([base, *parts])


def expand(config: Path, grid: list[str], overrides: list[str], out_root: Path | None = None) -> list[tuple[dict, ExperimentConfig]]:
    """Every run of the grid, validated (all of them, before any work starts)."""
    axes = parse_grid(grid)
    base = load_config(config, overrides)
    runs = []
    for values in itertools.product(*[vals for _, vals in axes]):
        combo = list(zip([k for k, _ in axes], values))
        name = run_name(base.name, combo, [k for k, _ in axes])
        cfg = load_config(config, [*overrides, *(f"{k}={v}" for k, v in combo), f"name={name}"])
        if out_root is not None:
            cfg.output.root = out_root
        runs.append((dict(combo), cfg))
    return runs


def sweep_run(config: Path, grid: list[str], overrides: list[str] | None = None, out_root: Path | None = None,
              executor=None, resume: bool = False, progress=None) -> dict:
    """Run every (run, category) of the grid as one job each; write per-run and sweep summaries."""
    t0 = time.perf_counter()
    runs = expand(config, grid, list(overrides or []), out_root)
    base = load_config(config, overrides)
    if base.output.html:  # before any work, as eval: the pages' plots need matplotlib
        require("matplotlib", extra="report")
    plan = []  # (overrides, cfg, out, jobs)
    for combo, cfg in runs:
        out = run_dir(cfg, None)
        jobs = category_jobs(cfg, eval_category, out, model_arg=None)
        check_outputs(out, [j.name for j in jobs])
        plan.append((combo, cfg, out, [replace(j, name=f"{cfg.name}/{j.name}") for j in jobs]))
    all_jobs = [j for *_, jobs in plan for j in jobs]
    kept = {i: r for i, j in enumerate(all_jobs) if resume and (r := finished_report(j)) is not None}
    ran = iter((executor or LocalExecutor()).run([j for i, j in enumerate(all_jobs) if i not in kept], progress))
    results = [kept[i] if i in kept else next(ran) for i in range(len(all_jobs))]

    rows, at = [], 0
    for combo, cfg, out, jobs in plan:
        # inside its run, a result is named by its category
        mine = [replace(r, name=j.kwargs["category"]) for j, r in zip(jobs, results[at : at + len(jobs)])]
        at += len(jobs)
        summary = finish_run(cfg, out, "eval", mine, t0)
        if summary["categories"]:
            write_summary_pages(out, summary, cfg.output.html)
        rows.append({"run": cfg.name, "overrides": combo, "status": summary["status"], "mean": summary["mean"],
                     "categories": {k: v["metrics"] for k, v in summary["categories"].items()},
                     "failed": summary["failed"], "resumed": summary["resumed"], "summary": str(out / "summary.json")})
    folder = Path(out_root or base.output.root) / f"{base.name}-sweep"
    doc = {"name": base.name, "config": str(config), "grid": dict(parse_grid(grid)), "overrides": list(overrides or []),
           "executor": getattr(executor, "backend", "local"), "status": "failed" if any(r["failed"] for r in rows) else "ok",
           "runs": rows, "total_s": time.perf_counter() - t0}
    write_json(folder / "sweep.json", doc)
    (folder / "sweep.md").write_text(markdown(doc))
    if base.output.html:
        (folder / "index.html").write_text(index_html(doc, folder))
    doc["folder"] = str(folder)
    raise_failures(results)
    return doc


def markdown(doc: dict) -> str:
    """The sweep as one table: a row per run and category, then the run's mean."""
    keys = list(doc["grid"])
    head = ["run", *keys, "category", *METRIC_KEYS]
    lines = [f"# Sweep {doc['name']} ({doc['config']})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for row in doc["runs"]:
        cells = [row["run"], *(row["overrides"][k] for k in keys)]
        for cat, m in row["categories"].items():
            lines.append("| " + " | ".join([*cells, cat, *(fmt(m.get(k)) for k in METRIC_KEYS)]) + " |")
        if len(row["categories"]) > 1:
            lines.append("| " + " | ".join([*cells, "**mean**", *(fmt(row["mean"][k]) for k in METRIC_KEYS)]) + " |")
        for cat, f in row["failed"].items():
            lines.append("| " + " | ".join([*cells, cat, f"FAILED after {f['attempts']} attempt(s): {f['error']}".replace("|", "/"),
                                            *([""] * (len(METRIC_KEYS) - 1))]) + " |")
    return "\n".join(lines) + "\n"


def index_html(doc: dict, folder: Path) -> str:
    """The sweep table as a page, each run linked to its own index.html."""
    from html import escape
    from os.path import relpath

    head = "".join(f"<th>{escape(h)}</th>" for h in ["run", *doc["grid"], "category", *METRIC_KEYS])
    rows = []
    for row in doc["runs"]:
        link = relpath(Path(row["summary"]).parent / "index.html", folder)
        cells = f'<td><a href="{escape(link)}">{escape(row["run"])}</a></td>' + "".join(f"<td>{escape(row['overrides'][k])}</td>" for k in doc["grid"])
        for cat, m in row["categories"].items():
            rows.append(f"<tr>{cells}<td>{escape(cat)}</td>" + "".join(f"<td>{'-' if m.get(k) is None else f'{m[k]:.3f}'}</td>" for k in METRIC_KEYS) + "</tr>")
        for cat, f in row["failed"].items():
            rows.append(f"<tr>{cells}<td>{escape(cat)}</td><td colspan='{len(METRIC_KEYS)}'>FAILED after {f['attempts']} attempt(s): {escape(f['error'])}</td></tr>")
    return (f"<!doctype html><meta charset='utf-8'><title>Sweep {escape(doc['name'])}</title><style>{CSS}</style>"
            f"<h1>Sweep {escape(doc['name'])}</h1><table><tr>{head}</tr>{''.join(rows)}</table>")
