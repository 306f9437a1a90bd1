"""The ``pyimgano`` command line: parse, call the engine, print. No numerics here.

Commands live in two modules: this one (validate, fit, eval, report, compare, export-maps, sweep,
detectors, data) and :mod:`.deploy` (export-onnx, quantize, serve); :mod:`.common` holds the app,
options and the error guard they share.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import deploy  # noqa: F401  (registers export-onnx, quantize, serve)
from .common import JsonOpt, OutOpt, QuietOpt, RayOpt, ResumeOpt, SetOpt, app, check_out, err, fmt, guard, load, out, print_metrics, print_warnings, progress_for, with_executor


@app.command()
def validate(config: Path, set_: list[str] = SetOpt) -> None:
    """Check a config file (schema, detector parameters) without running anything."""
    cfg = guard(lambda: load(config, set_))
    out.print(escape(f"ok: {config} ({cfg.detector.name} on {cfg.dataset.type})"), highlight=False, soft_wrap=True)


@app.command()
def fit(config: Path, set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt,
        as_json: bool = JsonOpt, quiet: bool = QuietOpt, ray: Optional[str] = RayOpt) -> None:
    """Fit the detector on each category's normal images and save the model folders."""
    def body():
        cfg = load(config, set_, out_root)
        from pyimgano_core.runs import fit_run  # heavy (the engine): after the config passed

        return with_executor(cfg.execution, ray, lambda ex: fit_run(cfg, progress=progress_for(quiet, as_json), executor=ex))

    summary = guard(body)
    print_warnings(summary)  # also with -q: -q hides progress and tables, never a warning
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

    gates = guard(lambda: parse_gates(fail_under))

    def body():
        cfg = load(config, set_, out_root)
        from pyimgano_core.runs import eval_run  # heavy (the engine): after the config passed

        return with_executor(cfg.execution, ray, lambda ex: eval_run(cfg, model_arg=model, progress=progress_for(quiet, as_json),
                                                            executor=ex, resume=resume))

    summary = guard(body)
    print_metrics(summary, as_json, quiet)
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

    pages = guard(lambda: rebuild(run_dir))
    for page in pages:
        out.print(f"written: {escape(str(page))}", highlight=False)


@app.command()
def compare(run_a: Path, run_b: Path, tolerance: float = typer.Option(0.005, "--tolerance", min=0.0,
            help="A drop of more than this (B - A < -tolerance) is a regression."), as_json: bool = JsonOpt) -> None:
    """Metric differences B - A per category; exit code 6 when B regressed beyond the tolerance."""
    from pyimgano_core.outputs.report import GATE_EXIT_CODE, METRIC_NAMES
    from pyimgano_core.outputs.report.compare import compare_runs

    result = guard(lambda: compare_runs(run_a, run_b, tolerance))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        table = Table(title=f"B - A  (A: {escape(str(run_a))}, B: {escape(str(run_b))}, tolerance {tolerance:g})")
        for header in ("category", "metric", "A", "B", "B - A", ""):
            table.add_column(header, justify="left" if header in ("category", "metric", "") else "right")
        style = {"regression": "[bold red]REGRESSION[/]", "improved": "[green]improved[/]"}
        for r in result["rows"]:
            diff = "-" if r["diff"] is None else f"{r['diff']:+.4f}"
            table.add_row(escape(r["category"]), METRIC_NAMES.get(r["metric"], r.get("why", "")), fmt(r["a"]), fmt(r["b"]),
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
        check_out(out_root)  # cheap checks first: the shards and runs modules load the engine
        if config is not None:
            cfg = load(config, set_, out_root)
            from pyimgano_core.runs import export_run  # heavy (the engine): after the config passed
            from pyimgano_core.shards import parse_shard

            part = parse_shard(shard) if shard is not None else None

            return with_executor(cfg.execution, ray, lambda ex: export_run(cfg, model_arg=model, input_dir=input_dir,
                                  progress=progress_for(quiet, as_json), runtime=runtime, executor=ex, shard=part))
        from pyimgano_core.errors import ConfigError

        if model is None or input_dir is None or set_:
            raise ConfigError("export-maps without a config needs --model and --input (and takes no --set)")
        if runtime not in ("torch", "onnx"):
            raise ConfigError(f"--runtime must be torch or onnx, got {runtime!r}")
        # no config: nothing imports torch on the onnx runtime (inspection servers)
        from pyimgano_core.runs import export_folder_run
        from pyimgano_core.shards import parse_shard

        part = parse_shard(shard) if shard is not None else None

        return with_executor(None, ray, lambda ex: export_folder_run(model, input_dir, out_root, progress_for(quiet, as_json),
                                                                      runtime, executor=ex, shard=part))

    summary = guard(body)
    failed = sum(r.get("n_failed", 0) for r in summary["categories"].values())
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    elif not quiet:
        for cat, r in summary["categories"].items():
            out.print(escape(f"[{cat}]") + f" {r['n_scored']}/{r['n_images']} images scored ({fmt(r['images_per_s'])} img/s)"
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


@app.command()
def sweep(config: Path, grid: list[str] = typer.Option(..., "--grid", help="key.path=v1,v2,... (repeatable): one run per combination."),
          set_: list[str] = SetOpt, out_root: Optional[Path] = OutOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
          ray: Optional[str] = RayOpt, resume: bool = ResumeOpt) -> None:
    """Evaluate a grid of --set overrides: one report folder per run, one sweep table (JSON + Markdown)."""
    def body():
        cfg = load(config, set_, out_root)
        from pyimgano_core.sweep import sweep_run

        return with_executor(cfg.execution, ray, lambda ex: sweep_run(config, grid, set_, out_root, ex, resume, progress_for(quiet, as_json)))

    doc = guard(body)
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
        cfg = load(config, set_)
        return {s.name: describe(s) for s in load_splits(cfg.dataset)}

    info = guard(body)
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
