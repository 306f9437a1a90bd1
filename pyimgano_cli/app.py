"""The ``pyimgano`` command line: parse, call the engine, print. No numerics here."""
from __future__ import annotations

import inspect
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
def _out_text(value: str):
    """``--out``: kept as text when empty (Path("") is the current folder; refused in :func:`_check_out`)."""
    return Path(value) if value.strip() else ""


OutOpt = typer.Option(None, "--out", metavar="DIR", parser=_out_text, help="Output root (default: output.root of the config, 'reports').")
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


def _guard(fn: Callable[[], object]) -> object:
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


def _check_out(out_root) -> None:
    if isinstance(out_root, str) and not out_root.strip():
        from pyimgano_core.errors import ConfigError

        raise ConfigError("--out is empty; give an output folder (e.g. --out reports)")


def _load(config: Path, overrides: list[str], out_root: Optional[Path] = None):
    from pyimgano_core.config_file import read_config_file

    _check_out(out_root)
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


def _with_executor(execution, ray: Optional[str], work: Callable):
    """``work(executor)`` on the config's ``execution`` section (None: the defaults; ``--ray``
    overrides it); a Ray started here is shut down."""
    from pyimgano_core.execution import make_executor

    executor = make_executor(execution, ray)
    try:
        return work(executor)
    finally:
        executor.close()


def _progress(quiet: bool, as_json: bool):
    return None if quiet or as_json else RichProgress(err)


def _print_warnings(summary: dict) -> None:
    """Each warning once, on one line, naming the categories it applies to (stderr)."""
    seen: dict[str, list[str]] = {}
    for cat, r in summary.get("categories", {}).items():
        for w in r.get("warnings") or []:
            seen.setdefault(w, []).append(cat)
    for w, cats in seen.items():
        err.print(f"[yellow]warning[/] {escape('[' + ', '.join(cats) + ']')}: {escape(w)}", highlight=False, soft_wrap=True)


def _oracle(d) -> str:
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k.removesuffix('_f1_max')} {_fmt(v)}" for k, v in d.items())


def _fmt(v) -> str:
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
        table.add_row(f"[bold]{escape(cat)}[/]", *(_fmt(r["metrics"].get(k)) for k in METRIC_KEYS),
                      f"{t.get('fit_s', 0):.1f}", f"{t['predict_s_per_image']:.3f}")
        for d, m in r["per_defect"].items():
            table.add_row(escape(f"  {d} ({m['n']})"), *(_fmt(m.get(k)) for k in METRIC_KEYS), "", "")
    if len(summary["categories"]) > 1:
        table.add_row("[bold]mean[/]", *(_fmt(summary["mean"][k]) for k in METRIC_KEYS), "", "")
    return table


def _print_metrics(summary: dict, as_json: bool, quiet: bool) -> None:
    _print_warnings(summary)  # also with -q
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
                      f"FPR on test/good {_fmt(i['test_good_fpr'])})" + (f", pixel F1 {p['f1']:.3f}, IoU {p['iou']:.3f}" if p else "")
                      + f"; oracle F1-max (not a deployable threshold): {_oracle(dec['oracle_f1_max_NOT_a_deployable_threshold'])}")
            t = dec["thresholds"]
            if t.get("expected_fpr") is not None:
                out.print(escape(f"[{cat}]") + f" image threshold: rank {t['image_rank']} of {t['n_images']} held-out scores, promised "
                          f"false-alarm rate on new good parts {t['expected_fpr']:.3f} (95% upper bound {t['fpr_upper_95']:.3f})")
        out.print(f"report: {escape(r['report'])}", highlight=False)


@app.command()
def validate(config: Path, set_: list[str] = SetOpt) -> None:
    """Check a config file (schema, detector parameters) without running anything."""
    cfg = _guard(lambda: _load(config, set_))
    out.print(escape(f"ok: {config} ({cfg.detector.name} on {cfg.dataset.type})"), highlight=False, soft_wrap=True)


@app.command()
def fit(config: Path, set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt,
        as_json: bool = JsonOpt, quiet: bool = QuietOpt, ray: Optional[str] = RayOpt) -> None:
    """Fit the detector on each category's normal images and save the model folders."""
    def body():
        cfg = _load(config, set_, out_root)
        from pyimgano_core.runs import fit_run  # heavy (the engine): after the config passed

        return _with_executor(cfg.execution, ray, lambda ex: fit_run(cfg, progress=_progress(quiet, as_json), executor=ex))

    summary = _guard(body)
    _print_warnings(summary)  # also with -q: -q hides progress and tables, never a warning
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    elif not quiet:
        for cat, r in summary["categories"].items():
            out.print(escape(f"[{cat}] model saved to {r['model']} (fit {r['timing']['fit_s']:.1f} s)"))


@app.command("eval")
def eval_(config: Path, model: Optional[Path] = typer.Option(None, "--model", metavar="DIR", help="Saved model (or run) folder; fit if absent."),
          set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
          fail_under: Optional[str] = typer.Option(None, "--fail-under", help="Gates, e.g. image_auroc=0.99,aupro=0.9: "
                                                   "exit code 6 if any category falls short (reports are still written)."),
          ray: Optional[str] = RayOpt, resume: bool = ResumeOpt) -> None:
    """Fit (or load) and evaluate: metrics overall and per defect in report.json, and report.html."""
    from pyimgano_core.outputs.report.gates import check_gates, parse_gates

    gates = _guard(lambda: parse_gates(fail_under))

    def body():
        cfg = _load(config, set_, out_root)
        from pyimgano_core.runs import eval_run  # heavy (the engine): after the config passed

        return _with_executor(cfg.execution, ray, lambda ex: eval_run(cfg, model_arg=model, progress=_progress(quiet, as_json),
                                                            executor=ex, resume=resume))

    summary = _guard(body)
    _print_metrics(summary, as_json, quiet)
    failures = check_gates(summary, gates)
    for line in failures:
        err.print(f"[bold red]gate failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if failures:
        from pyimgano_core.outputs.report import GATE_EXIT_CODE

        raise typer.Exit(GATE_EXIT_CODE)


@app.command()
def report(run_dir: Path) -> None:
    """Rebuild report.html (and a run's index.html, summary.md) from the saved files of an eval."""
    from pyimgano_core.outputs.report.rebuild import rebuild

    pages = _guard(lambda: rebuild(run_dir))
    for page in pages:
        out.print(f"written: {escape(str(page))}", highlight=False)


@app.command()
def compare(run_a: Path, run_b: Path, tolerance: float = typer.Option(0.005, "--tolerance", min=0.0,
            help="A drop of more than this (B - A < -tolerance) is a regression."), as_json: bool = JsonOpt) -> None:
    """Metric differences B - A per category; exit code 6 when B regressed beyond the tolerance."""
    from pyimgano_core.outputs.report import GATE_EXIT_CODE, METRIC_NAMES
    from pyimgano_core.outputs.report.compare import compare_runs

    result = _guard(lambda: compare_runs(run_a, run_b, tolerance))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        table = Table(title=f"B - A  (A: {escape(str(run_a))}, B: {escape(str(run_b))}, tolerance {tolerance:g})")
        for header in ("category", "metric", "A", "B", "B - A", ""):
            table.add_column(header, justify="left" if header in ("category", "metric", "") else "right")
        style = {"regression": "[bold red]REGRESSION[/]", "improved": "[green]improved[/]"}
        for r in result["rows"]:
            diff = "-" if r["diff"] is None else f"{r['diff']:+.4f}"
            table.add_row(escape(r["category"]), METRIC_NAMES.get(r["metric"], r.get("why", "")), _fmt(r["a"]), _fmt(r["b"]),
                          diff, style.get(r["status"], r["status"]))
        out.print(table)
        if result["only_in_b"]:
            out.print(f"only in B: {escape(', '.join(result['only_in_b']))}", highlight=False)
        out.print(f"{result['n_regressions']} regression(s)", highlight=False)
    if result["regressed"]:
        raise typer.Exit(GATE_EXIT_CODE)


@app.command("export-maps")
def export_maps(config: Optional[Path] = typer.Argument(None, metavar="CONFIG", help="Experiment config (optional with --model and --input)."),
                model: Optional[Path] = typer.Option(None, "--model", metavar="DIR", help="Saved model (or run) folder; fit if absent."),
                input_dir: Optional[Path] = typer.Option(None, "--input", metavar="DIR", help="Folder of images to score (default: the test split)."),
                runtime: str = typer.Option("torch", "--runtime", help="torch, or onnx: the graph from 'pyimgano export-onnx' on onnxruntime (needs --model)."),
                set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
                ray: Optional[str] = RayOpt,
                shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N",
                                                    help="Score only shard I (0-based) of N of the sorted image list.")) -> None:
    """Write heatmap overlays, raw maps, defect masks and predictions.jsonl."""
    def body():
        _check_out(out_root)  # cheap checks first: the shards and runs modules load the engine
        if config is not None:
            cfg = _load(config, set_, out_root)
            from pyimgano_core.runs import export_run  # heavy (the engine): after the config passed
            from pyimgano_core.shards import parse_shard

            part = parse_shard(shard) if shard is not None else None

            return _with_executor(cfg.execution, ray, lambda ex: export_run(cfg, model_arg=model, input_dir=input_dir,
                                  progress=_progress(quiet, as_json), runtime=runtime, executor=ex, shard=part))
        from pyimgano_core.errors import ConfigError

        if model is None or input_dir is None or set_:
            raise ConfigError("export-maps without a config needs --model and --input (and takes no --set)")
        if runtime not in ("torch", "onnx"):
            raise ConfigError(f"--runtime must be torch or onnx, got {runtime!r}")
        # no config: nothing imports torch on the onnx runtime (inspection servers)
        from pyimgano_core.runs import export_folder_run
        from pyimgano_core.shards import parse_shard

        part = parse_shard(shard) if shard is not None else None

        return _with_executor(None, ray, lambda ex: export_folder_run(model, input_dir, out_root, _progress(quiet, as_json),
                                                                      runtime, executor=ex, shard=part))

    summary = _guard(body)
    failed = sum(r.get("n_failed", 0) for r in summary["categories"].values())
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    elif not quiet:
        for cat, r in summary["categories"].items():
            out.print(escape(f"[{cat}]") + f" {r['n_scored']}/{r['n_images']} images scored ({_fmt(r['images_per_s'])} img/s)"
                      + (f", {r['n_anomalous']} anomalous" if r.get("n_anomalous") is not None else ""))
            if r["n_scored"]:
                out.print(f"outputs written to {escape(r['out_dir'])}", highlight=False, soft_wrap=True)
            for f in r["failures"]:
                err.print(f"[yellow]skipped[/] {escape(f['path'])}: {escape(f['error'])}", highlight=False, soft_wrap=True)
    if failed:
        err.print(f"[bold red]error:[/] {escape(_failed_line(summary))}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)


def _failed_line(summary: dict) -> str:
    n = sum(r.get("n_images", 0) for r in summary["categories"].values())
    failed = sum(r.get("n_failed", 0) for r in summary["categories"].values())
    scored = sum(r.get("n_scored", 0) for r in summary["categories"].values())
    if scored:
        return f"{failed} of {n} image(s) could not be read; the other {scored} were exported"
    where = ", ".join(r["out_dir"] for r in summary["categories"].values())
    return f"none of the {n} image(s) could be read; nothing was exported and {where} is unchanged"


@app.command("export-onnx")
def export_onnx(model_dir: Path, out_file: Optional[Path] = typer.Option(None, "--out", parser=_out_text, help="ONNX file (default: MODEL_DIR/model.onnx)."),
                opset: int = typer.Option(17, "--opset", help="ONNX opset (13-20)."), as_json: bool = JsonOpt) -> None:
    """Export a fitted patch-kNN model to one ONNX graph, kept only if onnxruntime matches torch."""
    from pyimgano_core.deploy.onnx_export import export_onnx as run

    def body():
        _check_out(out_file)
        return run(model_dir, out_file, opset)

    info = _guard(body)
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    p = info["parity"]
    out.print(escape(f"wrote {info['file']} (sha256 {info['sha256'][:12]}..., input uint8 {info['inputs'][0]['shape']})"), highlight=False)
    out.print(escape(f"parity on {p['n_images']} {p['images']}: largest relative difference score {p['max_score_rel_diff']:.2g}, "
                     f"map {p['max_map_rel_diff']:.2g} (tolerance {p['rtol']:g})"
                     + (f", {p['decision_flips']} decision flips" if p["decision_flips"] is not None else "")), highlight=False)


@app.command()
def quantize(model_dir: Path, as_json: bool = JsonOpt) -> None:
    """Write model.int8.onnx: the exported graph with int8 backbone convolutions, kept only if decisions and maps hold."""
    from pyimgano_core.deploy.quantize import quantize_int8

    info = _guard(lambda: quantize_int8(model_dir))
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    p = info["parity"]
    out.print(escape(f"wrote {info['file']} (sha256 {info['sha256'][:12]}..., {info['calibration_images']} calibration images)"), highlight=False)
    out.print(escape(f"parity against the float32 graph on {p['n_images']} {p['images']}: largest relative difference score "
                     f"{p['max_score_rel_diff']:.2g} (tolerance {p['score_rtol']:g}), map {p['max_map_rel_diff']:.2g} "
                     f"(tolerance {p['map_rtol']:g})" + (f", {p['decision_flips']} decision flips" if p["decision_flips"] is not None else "")),
              highlight=False)


@app.command()
def serve(models: list[str] = typer.Option(..., "--model", metavar="[NAME=]DIR", help="Model folder to serve (repeatable); NAME defaults to its category."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
          port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, announced on stderr)."),
          runtime: str = typer.Option("torch", "--runtime", help="torch, onnx, openvino, onnx-int8 or openvino-int8."),
          token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding a bearer token every request but /healthz, /readyz needs."),
          max_batch: int = typer.Option(8, "--max-batch", min=1, max=16, help="Images per forward pass."),
          max_queue: int = typer.Option(32, "--max-queue", min=1, help="Images waiting per model before 503."),
          max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Largest request body.")) -> None:
    """Serve models over HTTP: /v1/predict, /v1/models, /healthz, /readyz, /metrics and a page at / (pip install "pyimgano[serve]")."""
    from pyimgano_core.serve import BatchSettings, HttpLimits, ServeOptions, serve as run

    opts = ServeOptions(models, runtime, host, port, str(token_file) if token_file else None, BatchSettings(max_batch=max_batch, max_queue=max_queue),
                        HttpLimits(max_body_bytes=int(max_body_mb * 2**20)))
    raise typer.Exit(_guard(lambda: run(opts, announce=lambda msg: err.print(escape(msg), highlight=False, soft_wrap=True))))


@app.command()
def sweep(config: Path, grid: list[str] = typer.Option(..., "--grid", help="key.path=v1,v2,... (repeatable): one run per combination."),
          set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
          ray: Optional[str] = RayOpt, resume: bool = ResumeOpt) -> None:
    """Evaluate a grid of --set overrides: one report folder per run, one sweep table (JSON + Markdown)."""
    def body():
        cfg = _load(config, set_, out_root)
        from pyimgano_core.sweep import sweep_run

        return _with_executor(cfg.execution, ray, lambda ex: sweep_run(config, grid, set_, out_root, ex, resume, _progress(quiet, as_json)))

    doc = _guard(body)
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
    elif not quiet:
        out.print((Path(doc["folder"]) / "sweep.md").read_text(), highlight=False, markup=False)


def _fields(model, prefix: str = "") -> dict:
    """Parameters by dotted path (``coreset.ratio``), with defaults; a sub-model default is listed field by field."""
    from pydantic import BaseModel

    out = {}
    for k, f in model.model_fields.items():
        if k in ("seed", "category") and not prefix:
            continue
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out[f"{prefix}{k}"] = {"default": default.model_dump(mode="json"), "required": False, "description": f.description}
            for sub, v in default.model_dump(mode="json").items():
                desc = type(default).model_fields[sub].description
                out[f"{prefix}{k}.{sub}"] = {"default": v, "required": False, "description": desc}
            continue
        out[f"{prefix}{k}"] = {"default": default, "required": f.is_required(), "description": f.description}
    return out


@app.command()
def detectors(as_json: bool = JsonOpt) -> None:
    """List the registered detectors with their parameters and defaults."""
    from pyimgano_core.detectors import get_detector_class, list_detectors

    info = {name: _fields(get_detector_class(name).Params) for name in list_detectors()}
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    for name, params in info.items():
        doc = inspect.getdoc(get_detector_class(name)) or ""
        out.print(f"[bold]{name}[/]  {escape(doc.splitlines()[0] if doc else '')}")
        for k, v in params.items():
            out.print(f"    {k} = " + ("(required)" if v["required"] else repr(v["default"])) + (f"  [dim]# {v['description']}[/]" if v["description"] else ""), highlight=False)


@app.command()
def data(config: Path, set_: list[str] = SetOpt, as_json: bool = JsonOpt) -> None:
    """Show what a config's dataset resolves to: counts, sizes, masks, problems."""
    from pyimgano_core.data import describe, load_splits

    def body():
        cfg = _load(config, set_)
        return {s.name: describe(s) for s in load_splits(cfg.dataset)}

    info = _guard(body)
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    for name, d in info.items():
        out.print(f"[bold]{name}[/]  ({d.get('root')}, mask value > {d.get('mask_threshold')})", highlight=False)
        for part in ("train", "test"):
            c = d[part]
            kinds = ", ".join(f"{k} {v}" for k, v in c["by_defect"].items())
            out.print(f"  {part}: {c['total']} images ({kinds})", highlight=False)
        size = d["image_size"]
        out.print(f"  image size: height {size['height'][0]}-{size['height'][1]}, width {size['width'][0]}-{size['width'][1]}"
                  f" ({size['distinct']} distinct)", highlight=False)
        m = d["masks"]
        out.print(f"  masks: {m['found']} found, {m['missing']} missing, {m['empty']} empty", highlight=False)
        if d.get("contamination"):
            out.print(f"  contamination: {len(d['contamination'].get('moved', []))} defective images moved into train", highlight=False)
        for problem in d.get("problems", [])[:10]:
            out.print(f"  [yellow]problem:[/] {escape(problem)}", highlight=False)


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:  # a lean install ("pyimgano[serve]") has no torch: fitting needs the extra
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        err.print("[bold red]error:[/] " + escape(f"this command needs {exc.name.split('.')[0]}, which is not installed; "
                  'install it with: pip install "pyimgano[torch]"'), highlight=False, soft_wrap=True)
        sys.exit(5)


if __name__ == "__main__":
    main()
