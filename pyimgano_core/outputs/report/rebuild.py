"""``pyimgano report RUN_DIR``: rebuild the pages of an eval from its saved files alone."""
from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .html import write_page
from .summary import load_summary, write_summary_pages


def rebuild(run_dir: Path) -> list[Path]:
    """A category folder (report.json) -> its report.html; a run folder (summary.json) -> every
    category's page, ``index.html`` and ``summary.md``. Returns the pages written."""
    run_dir = Path(run_dir)
    if (run_dir / "report.json").is_file():
        return [write_page(run_dir)]
    if not (run_dir / "summary.json").is_file():
        raise DataError(f"{run_dir}: no report.json or summary.json (give a folder written by 'pyimgano eval')")
    summary = load_summary(run_dir)
    pages = []
    for cat in summary["categories"]:
        if not (run_dir / cat / "report.json").is_file():
            raise DataError(f"{run_dir / cat}: report.json is missing")
        pages.append(write_page(run_dir / cat))
    write_summary_pages(run_dir, summary, html=True)
    return pages + [run_dir / "index.html", run_dir / "summary.md"]
