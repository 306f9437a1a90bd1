"""Deployment commands: export-onnx, quantize (int8) and serve (the HTTP service)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import JsonOpt, app, check_out, err, guard, out, out_text


@app.command("export-onnx")
def export_onnx(model_dir: Path, out_file: Optional[Path] = typer.Option(None, "--out", parser=out_text, help="ONNX file (default: MODEL_DIR/model.onnx)."),
                opset: int = typer.Option(17, "--opset", help="ONNX opset (13-20)."), as_json: bool = JsonOpt) -> None:
    """Export a fitted patch-kNN model to one ONNX graph, kept only if onnxruntime matches torch."""
    from pyimgano_core.deploy.onnx_export import export_onnx as run

    def body():
        check_out(out_file)
        return run(model_dir, out_file, opset)

    info = guard(body)
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    _print_written(info, f"input uint8 {info['inputs'][0]['shape']}", "parity",
                   f"{info['parity']['max_score_rel_diff']:.2g}, map {info['parity']['max_map_rel_diff']:.2g} "
                   f"(tolerance {info['parity']['rtol']:g})")


@app.command()
def quantize(model_dir: Path, as_json: bool = JsonOpt) -> None:
    """Write model.int8.onnx: the exported graph with int8 backbone convolutions, kept only if decisions and maps hold."""
    from pyimgano_core.deploy.quantize import quantize_int8

    info = guard(lambda: quantize_int8(model_dir))
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    p = info["parity"]
    _print_written(info, f"{info['calibration_images']} calibration images", "parity against the float32 graph",
                   f"{p['max_score_rel_diff']:.2g} (tolerance {p['score_rtol']:g}), map {p['max_map_rel_diff']:.2g} "
                   f"(tolerance {p['map_rtol']:g})")


def _print_written(info: dict, what: str, check: str, differences: str) -> None:
    """The file a deploy command kept, and the parity check that let it keep it."""
    p = info["parity"]
    out.print(escape(f"wrote {info['file']} (sha256 {info['sha256'][:12]}..., {what})"), highlight=False)
    out.print(escape(f"{check} on {p['n_images']} {p['images']}: largest relative difference score {differences}"
                     + (f", {p['decision_flips']} decision flips" if p["decision_flips"] is not None else "")), highlight=False)


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
    raise typer.Exit(guard(lambda: run(opts, announce=lambda msg: err.print(escape(msg), highlight=False, soft_wrap=True))))
