"""Over the categories of a run: ``summary.md`` (the papers' table) and ``index.html``.

One row per category and a mean row, columns image AUROC / AP, pixel AUROC / AP, AUPRO,
as MVTec AD and VisA results are tabulated. Both are rebuilt from ``summary.json``.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from ...errors import DataError
from ..files import write_text
from . import METRIC_NAMES
from .html import CSS


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise DataError(f"No summary.json in {run_dir} (a run folder written by 'pyimgano eval')")
    summary = json.loads(path.read_text())
    if summary.get("command") != "eval":
        raise DataError(f"{path} was written by 'pyimgano {summary.get('command')}', not by 'pyimgano eval'")
    return summary


def markdown(summary: dict) -> str:
    cols = list(METRIC_NAMES)
    lines = [f"# {summary['name']} ({summary['detector']})", "",
             "| category | " + " | ".join(METRIC_NAMES[k] for k in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for cat, r in summary["categories"].items():
        lines.append(f"| {cat} | " + " | ".join(_fmt(r["metrics"].get(k)) for k in cols) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(summary['mean'].get(k))}**" for k in cols) + " |")
    if summary.get("status") != "ok":
        lines += ["", f"Run status: {summary.get('status')}: {summary.get('error')}"]
    return "\n".join(lines) + "\n"


def index_html(summary: dict, run_dir: Path) -> str:
    cols = list(METRIC_NAMES)
    head = "".join(f"<th>{METRIC_NAMES[k]}</th>" for k in cols)
    rows = []
    for cat, r in summary["categories"].items():
        page = Path(run_dir) / cat / "report.html"
        name = f'<a href="{escape(cat)}/report.html">{escape(cat)}</a>' if page.is_file() else escape(cat)
        rows.append(f"<tr><td>{name}</td>" + "".join(f"<td>{_fmt(r['metrics'].get(k))}</td>" for k in cols) + "</tr>")
    rows.append('<tr class="all"><td>mean</td>' + "".join(f"<td>{_fmt(summary['mean'].get(k))}</td>" for k in cols) + "</tr>")
    title = f"{summary['name']} ({summary['detector']})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>{escape(title)} — pyimgano</title><style>{CSS}</style></head>
<body><main><h1>{escape(title)}</h1><p class="sub">{len(summary['categories'])} categories · status {escape(str(summary.get('status')))}</p>
<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>
<p class="note">Each category name links to its report page. Mean: over the categories where the metric is defined.</p>
</main></body></html>
"""


def write_summary_pages(run_dir: Path, summary: dict, html: bool) -> None:
    """``summary.md`` always; ``index.html`` linking each category's page when ``html``."""
    write_text(Path(run_dir) / "summary.md", markdown(summary))
    if html:
        write_text(Path(run_dir) / "index.html", index_html(summary, run_dir))
