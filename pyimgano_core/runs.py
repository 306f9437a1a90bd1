"""Whole runs over every category of a config: output folders, saved models, summaries.

Outputs go to ``<out>/<name>/<category>/`` (``report.json``, ``predictions.jsonl``,
``model/``, ``maps/``) and ``<out>/<name>/summary.json``. A run that fails half-way still
writes a summary saying which categories finished; reports of earlier runs are only ever
replaced by complete new ones (atomic writes).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import load_splits
from .data.io import is_image_file
from .data.types import Split
from .engine import Progress, build_model, evaluate_split, export_images
from .errors import ConfigError, DataError, ModelError, OptionalDependencyError, PyimganoError
from .optional import require
from .reporting.html import write_page
from .reporting.summary import write_summary_pages
from .outputs import check_writable
from .reports import write_json

if TYPE_CHECKING:  # export-maps --runtime onnx without a config must not import torch
    from .config import ExperimentConfig
    from .model import Model

EXPORT_SUMMARY = "export_summary.json"  # never the eval run's summary.json
METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def run_dir(cfg: ExperimentConfig, out_root: Path | None) -> Path:
    return Path(out_root or cfg.output.root) / cfg.name


def find_model(model_arg: Path, category: str) -> Path:
    """``--model`` may name a model folder, or a run folder holding ``<category>/model``."""
    model_arg = Path(model_arg)
    for candidate in (model_arg, model_arg / category / "model", model_arg / "model"):
        if (candidate / "model.json").is_file():
            return candidate
    raise ModelError(f"No saved model for category {category!r} under {model_arg} (expected model.json there or in {category}/model/)")


def load_for_runtime(folder: Path, runtime: str = "torch"):
    """A saved model for the torch path (:class:`Model`) or for onnxruntime (``deploy.onnx_runtime``)."""
    if runtime == "onnx":
        from .deploy.onnx_runtime import load_onnx_model

        return load_onnx_model(folder)
    from .model import Model

    return Model.load(folder)


def _saved_params(model) -> dict:
    fitted = getattr(model.detector, "params_", None)  # torch detector; the ONNX one keeps model.json's dict
    params = fitted.model_dump(mode="json") if fitted is not None else model.detector.params
    return {k: v for k, v in params.items() if k not in ("seed", "category")}  # category: set per run


def _load_model(cfg: ExperimentConfig, model_arg: Path, category: str, runtime: str = "torch") -> Model:
    folder = find_model(model_arg, category)
    model = load_for_runtime(folder, runtime)
    if model.detector.name != cfg.detector.name:
        raise ModelError(f"{folder}: saved model is {model.detector.name!r} but the config asks for {cfg.detector.name!r}")
    # A saved model is used as fitted: refuse, rather than silently ignore, a config that differs.
    saved = _saved_params(model)
    diff = sorted(k for k in set(saved) | set(cfg.detector.params) if saved.get(k) != cfg.detector.params.get(k))
    if diff:
        raise ModelError(f"{folder}: saved with other detector.params ({', '.join(f'{k}={saved.get(k)!r}' for k in diff[:4])}) "
                         "than the config; refit with 'pyimgano fit' or use the same settings")
    if model.postprocess.config != cfg.postprocess:
        raise ModelError(f"{folder}: saved with another 'postprocess' section than the config; refit or use the same settings")
    return model


def _summary(cfg: ExperimentConfig, command: str, done: dict, status: str, error: str | None, t0: float) -> dict:
    means = {}
    for key in METRIC_KEYS:
        vals = [r["metrics"].get(key) for r in done.values() if r.get("metrics")]
        vals = [v for v in vals if v is not None]
        means[key] = float(np.mean(vals)) if vals else None
    return {"name": cfg.name, "command": command, "status": status, "error": error, "detector": cfg.detector.name,
            "categories": done, "mean": means, "total_s": time.perf_counter() - t0}


def _loop(cfg: ExperimentConfig, out: Path, command: str, splits: list[Split], body, summary_name: str = "summary.json") -> dict:
    """Run ``body(split) -> dict`` per category; always leave a truthful summary file."""
    check_writable(out, "run folder")
    for split in splits:  # before any work: a file where a category folder must go fails now
        check_writable(out / split.name, "category folder")
    t0 = time.perf_counter()
    done: dict = {}
    try:
        for split in splits:
            done[split.name] = body(split)
    except PyimganoError as exc:
        if done:
            write_json(out / summary_name, _summary(cfg, command, done, "failed", str(exc), t0))
        raise
    summary = _summary(cfg, command, done, "ok", None, t0)
    write_json(out / summary_name, summary)
    return summary


def fit_run(cfg: ExperimentConfig, out_root: Path | None = None, progress: Progress | None = None) -> dict:
    from .model import check_target

    out = run_dir(cfg, out_root)
    splits = load_splits(cfg.dataset)
    for split in splits:
        check_target(out / split.name / "model")

    def body(split: Split) -> dict:
        model, timing = build_model(cfg, split, progress)
        folder = model.save(out / split.name / "model")
        warnings = [model.thresholds.warning] if model.thresholds and model.thresholds.warning else []
        return {"model": str(folder), "timing": timing, "thresholds": model.thresholds.to_dict() if model.thresholds else None,
                "warnings": warnings}

    return _loop(cfg, out, "fit", splits, body)


def eval_run(cfg: ExperimentConfig, out_root: Path | None = None, model_arg: Path | None = None,
             progress: Progress | None = None) -> dict:
    out = run_dir(cfg, out_root)

    def body(split: Split) -> dict:
        if model_arg is not None:
            model, timing = _load_model(cfg, model_arg, split.name), {"fit_s": 0.0, "loaded_from": str(model_arg)}
        else:
            model, timing = build_model(cfg, split, progress)
        report = evaluate_split(cfg, split, model, out / split.name, progress, timing)
        if cfg.output.html:
            write_page(out / split.name)
        return {k: report[k] for k in ("metrics", "per_defect", "decisions", "counts", "timing", "warnings")} | {"report": str(out / split.name / "report.json")}

    if cfg.output.html:  # before any work: the page's plots need matplotlib
        try:
            require("matplotlib", extra="report")
        except OptionalDependencyError as exc:
            raise OptionalDependencyError(f"{exc} (or set output.html: false)") from None
    summary = _loop(cfg, out, "eval", load_splits(cfg.dataset), body)
    write_summary_pages(out, summary, cfg.output.html)
    return summary


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"Input folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise DataError(f"No images (png, jpg, bmp, tif) found under {folder}")
    return images


def export_run(cfg: ExperimentConfig, out_root: Path | None = None, model_arg: Path | None = None,
               input_dir: Path | None = None, progress: Progress | None = None, runtime: str = "torch") -> dict:
    """Maps for the test split of each category, or for every image under ``input_dir``.

    ``runtime="onnx"`` scores with the exported ONNX graph (needs ``model_arg``)."""
    out = run_dir(cfg, out_root)
    if runtime not in ("torch", "onnx"):
        raise ConfigError(f"--runtime must be torch or onnx, got {runtime!r}")
    if runtime == "onnx" and model_arg is None:
        raise ConfigError(f"--runtime {runtime} needs --model (a model folder exported with 'pyimgano export-onnx')")
    images = list_images(Path(input_dir)) if input_dir is not None else None
    if images is not None and model_arg is not None:
        return export_folder_run(model_arg, input_dir, out_root or cfg.output.root, progress, runtime, cfg.name)
    splits = load_splits(cfg.dataset)
    if images is not None and len(splits) != 1:
        raise ConfigError(f"--input needs a config with one category (or --model); this one has {len(splits)}")

    def body(split: Split) -> dict:
        model = _load_model(cfg, model_arg, split.name, runtime) if model_arg is not None else build_model(cfg, split, progress)[0]
        if images is not None:
            return export_images(model, images, out / split.name / "export", progress, base=Path(input_dir))
        paths = [s.path for s in split.test]
        return export_images(model, paths, out / split.name / "maps", progress, base=_common_root(paths))

    return _loop(cfg, out, "export-maps", splits, body, EXPORT_SUMMARY)


def export_folder_run(model_arg: Path, input_dir: Path, out_root: Path | None = None, progress: Progress | None = None,
                      runtime: str = "torch", name: str | None = None) -> dict:
    """Maps for every image under ``input_dir`` with a saved model: no config, no dataset.

    Outputs go to ``<out_root>/<name>/<category>/export`` (``name``/``category``: the model's
    own unless given) and ``<out_root>/<name>/export_summary.json``. With ``runtime="onnx"``
    nothing here imports torch.
    """
    folder = Path(model_arg) if (Path(model_arg) / "model.json").is_file() else _single_model(model_arg)
    images = list_images(Path(input_dir))
    model = load_for_runtime(folder, runtime)
    name = name or model.meta.get("name") or "export"
    category = model.meta.get("category") or "input"
    out = Path(out_root or "reports") / name
    check_writable(out / category / "export")
    summary = export_images(model, images, out / category / "export", progress, base=Path(input_dir))
    result = {"name": name, "command": "export-maps", "status": "ok", "model": str(folder), "categories": {category: summary}}
    write_json(out / EXPORT_SUMMARY, result)
    return result


def _single_model(model_arg: Path) -> Path:
    found = sorted(Path(model_arg).glob("*/model/model.json"))
    if len(found) != 1:
        raise ModelError(f"--model {model_arg}: expected one model folder (model.json), found {len(found)}")
    return found[0].parent


def _common_root(paths: list[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(Path(p).parent) for p in paths])) if paths else Path(".")
