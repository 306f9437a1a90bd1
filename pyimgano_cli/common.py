"""What the command modules share: the Typer app, consoles, common options, the error guard, the
config loader and the printing of results. No numerics here."""
from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .progress import RichProgress

# rich_markup_mode=None: plain click help, where flags carry no type tag (typer's rich help
# renders every flag as "--json <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="pyimgano: learn 'normal' from good images, score new images and map their defects.")
err = Console(stderr=True)
out = Console()

SetOpt = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config field: key.path=value (repeatable).")
def out_text(value: str):
    """``--out``: kept as text when empty (Path("") is the current folder; refused in :func:`check_out`)."""
    return Path(value) if value.strip() else ""


OutOpt = typer.Option(None, "--out", metavar="DIR", parser=out_text, help="Output root (default: output.root of the config, 'reports').")
JsonOpt = typer.Option(False, "--json", help="Print the summary JSON alone on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or tables (warnings and errors still print).")
RayOpt = typer.Option(None, "--ray", metavar="ADDRESS",
                      help="Run on Ray: 'local' (start one in this process), 'auto' (a running cluster), ray://host:port.")
ResumeOpt = typer.Option(False, "--resume", help="Skip categories whose report.json exists with the same config hash.")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager stopping us): unwinds like Ctrl-C, so temp files are removed."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def _version(value: bool) -> None:
    if value:
        from pyimgano_core import __version__

        out.print(f"pyimgano {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")) -> None:
    """pyimgano: learn 'normal' from good images, score new images and map their defects."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def guard(fn: Callable[[], object]) -> object:
    """Run a command body; user errors become one line on stderr and a non-zero exit."""
    from pyimgano_core.errors import PyimganoError

    try:
        return fn()
    except PyimganoError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        err.print("terminated (SIGTERM); partial outputs removed")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err.print("interrupted; partial outputs removed")
        raise typer.Exit(130) from None
    except OSError as exc:  # an output write the pre-checks could not foresee (disk full, lost mount)
        import errno

        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        err.print(f"[bold red]error:[/] {escape((exc.strerror or type(exc).__name__) + where)}", highlight=False, soft_wrap=True)
        raise typer.Exit(7 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 1) from None
    except MemoryError:
        err.print("[bold red]error:[/] out of memory (try metrics.resolution, a smaller image_size or coreset_ratio)")
        raise typer.Exit(1) from None


def check_out(out_root) -> None:
    if isinstance(out_root, str) and not out_root.strip():
        from pyimgano_core.errors import ConfigError

        raise ConfigError("--out is empty; give an output folder (e.g. --out reports)")


def load(config: Path, overrides: list[str], out_root: Optional[Path] = None):
    from pyimgano_core.config_file import read_config_file

    check_out(out_root)
    data = read_config_file(config)  # a missing file or bad YAML: answered before the heavy imports
    from pyimgano_core.config import load_config

    with warnings.catch_warnings(record=True) as caught:  # earlier flat keys: one line each, naming the new path
        warnings.simplefilter("always", FutureWarning)
        cfg = load_config(config, overrides, data)
    for w in caught:
        err.print(f"[yellow]warning[/]: {escape(str(w.message))}", highlight=False, soft_wrap=True)
    if out_root is not None:
        cfg.output.root = out_root
    return cfg


def with_executor(execution, ray: Optional[str], work: Callable):
    """``work(executor)`` on the config's ``execution`` section (None: the defaults; ``--ray``
    overrides it); a Ray started here is shut down."""
    from pyimgano_core.execution import make_executor

    executor = make_executor(execution, ray)
    try:
        return work(executor)
    finally:
        executor.close()


def progress_for(quiet: bool, as_json: bool):
    return None if quiet or as_json else RichProgress(err)


def print_warnings(summary: dict) -> None:
    """Each warning once, on one line, naming the categories it applies to (stderr)."""
    seen: dict[str, list[str]] = {}
    for cat, r in summary.get("categories", {}).items():
        for w in r.get("warnings") or []:
            seen.setdefault(w, []).append(cat)
    for w, cats in seen.items():
        err.print(f"[yellow]warning[/] {escape('[' + ', '.join(cats) + ']')}: {escape(w)}", highlight=False, soft_wrap=True)


def oracle_text(d) -> str:
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k.removesuffix('_f1_max')} {fmt(v)}" for k, v in d.items())


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def results_table(summary: dict) -> Table:
    """Metrics per category and defect; at 80 columns the names stay whole (headers wrap instead)."""
    from pyimgano_core.runs import METRIC_KEYS

    table = Table(title=f"{summary['name']} ({summary['detector']})")
    table.add_column("category / defect", no_wrap=True)  # defect names whole; the number columns' headers wrap
    for header in ("img AUROC", "img AP", "pix AUROC", "pix AP", "AUPRO", "fit s", "s/img"):
        table.add_column(header, justify="right", no_wrap=False, min_width=5)
    for cat, r in summary["categories"].items():
        t = r["timing"]
        table.add_row(f"[bold]{escape(cat)}[/]", *(fmt(r["metrics"].get(k)) for k in METRIC_KEYS),
                      f"{t.get('fit_s', 0):.1f}", f"{t['predict_s_per_image']:.3f}")
        for d, m in r["per_defect"].items():
            table.add_row(escape(f"  {d} ({m['n']})"), *(fmt(m.get(k)) for k in METRIC_KEYS), "", "")
    if len(summary["categories"]) > 1:
        table.add_row("[bold]mean[/]", *(fmt(summary["mean"][k]) for k in METRIC_KEYS), "", "")
    return table


def print_metrics(summary: dict, as_json: bool, quiet: bool) -> None:
    print_warnings(summary)  # also with -q
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        return
    if quiet:
        return
    out.print(results_table(summary))
    for cat, r in summary["categories"].items():
        dec = r.get("decisions")
        if dec:
            i, p = dec["image"], dec.get("pixel")
            out.print(escape(f"[{cat}]") + f" at calibrated thresholds: image F1 {i['f1']:.3f} (P {i['precision']:.3f}, R {i['recall']:.3f}, "
                      f"FPR on test/good {fmt(i['test_good_fpr'])})" + (f", pixel F1 {p['f1']:.3f}, IoU {p['iou']:.3f}" if p else "")
                      + f"; oracle F1-max (not a deployable threshold): {oracle_text(dec['oracle_f1_max_NOT_a_deployable_threshold'])}")
            t = dec["thresholds"]
            if t.get("expected_fpr") is not None:
                out.print(escape(f"[{cat}]") + f" image threshold: rank {t['image_rank']} of {t['n_images']} held-out scores, promised "
                          f"false-alarm rate on new good parts {t['expected_fpr']:.3f} (95% upper bound {t['fpr_upper_95']:.3f})")
        out.print(f"report: {escape(r['report'])}", highlight=False)
