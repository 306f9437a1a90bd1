"""Whole runs over every category of a config: output folders, saved models, summaries.

Outputs go to ``<out>/<name>/<category>/`` (``report.json``, ``predictions.jsonl``,
``model/``, ``maps/``) and ``<out>/<name>/summary.json``. A run that fails half-way still
writes a summary saying which categories finished; reports of earlier runs are only ever
replaced by complete new ones (atomic writes).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .data import load_splits
from .data.io import is_image_file
from .data.types import Split
from .engine import Progress, build_model, evaluate_split, export_images
from .errors import ConfigError, DataError, ModelError, OptionalDependencyError, PyimganoError
from .model import Model
from .optional import require
from .reporting.html import write_page
from .reporting.summary import write_summary_pages
from .reports import write_json

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


def _load_model(cfg: ExperimentConfig, model_arg: Path, category: str) -> Model:
    folder = find_model(model_arg, category)
    model = Model.load(folder)
    if model.detector.name != cfg.detector.name:
        raise ModelError(f"{folder}: saved model is {model.detector.name!r} but the config asks for {cfg.detector.name!r}")
    # A saved model is used as fitted: refuse, rather than silently ignore, a config that differs.
    saved = {k: v for k, v in model.detector.params_.model_dump(mode="json").items() if k != "seed"}
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


def _loop(cfg: ExperimentConfig, out: Path, command: str, splits: list[Split], body) -> dict:
    """Run ``body(split) -> dict`` per category; always leave a truthful summary.json."""
    t0 = time.perf_counter()
    done: dict = {}
    try:
        for split in splits:
            done[split.name] = body(split)
    except PyimganoError as exc:
        if done:
            write_json(out / "summary.json", _summary(cfg, command, done, "failed", str(exc), t0))
        raise
    summary = _summary(cfg, command, done, "ok", None, t0)
    write_json(out / "summary.json", summary)
    return summary


def fit_run(cfg: ExperimentConfig, out_root: Path | None = None, progress: Progress | None = None) -> dict:
    out = run_dir(cfg, out_root)

    def body(split: Split) -> dict:
        model, timing = build_model(cfg, split, progress)
        folder = model.save(out / split.name / "model")
        return {"model": str(folder), "timing": timing, "thresholds": model.thresholds.to_dict() if model.thresholds else None}

    return _loop(cfg, out, "fit", load_splits(cfg.dataset), body)


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
        return {k: report[k] for k in ("metrics", "per_defect", "decisions", "counts", "timing")} | {"report": str(out / split.name / "report.json")}

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
               input_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Maps for the test split of each category, or for every image under ``input_dir``."""
    out = run_dir(cfg, out_root)
    images = list_images(Path(input_dir)) if input_dir is not None else None
    if images is not None and model_arg is not None:
        # Scoring a folder with a saved model needs no dataset at all.
        model = Model.load(model_arg if (Path(model_arg) / "model.json").is_file() else _single_model(model_arg))
        category = model.meta.get("category", "input")
        summary = export_images(model, images, out / category / "export", progress, base=Path(input_dir))
        write_json(out / "summary.json", {"name": cfg.name, "command": "export-maps", "status": "ok", "categories": {category: summary}})
        return {"name": cfg.name, "status": "ok", "categories": {category: summary}}
    splits = load_splits(cfg.dataset)
    if images is not None and len(splits) != 1:
        raise ConfigError(f"--input needs a config with one category (or --model); this one has {len(splits)}")

    def body(split: Split) -> dict:
        model = _load_model(cfg, model_arg, split.name) if model_arg is not None else build_model(cfg, split, progress)[0]
        if images is not None:
            return export_images(model, images, out / split.name / "export", progress, base=Path(input_dir))
        paths = [s.path for s in split.test]
        return export_images(model, paths, out / split.name / "maps", progress, base=_common_root(paths))

    return _loop(cfg, out, "export-maps", splits, body)


def _single_model(model_arg: Path) -> Path:
    found = sorted(Path(model_arg).glob("*/model/model.json"))
    if len(found) != 1:
        raise ModelError(f"--model {model_arg}: expected one model folder (model.json), found {len(found)}")
    return found[0].parent


def _common_root(paths: list[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(Path(p).parent) for p in paths])) if paths else Path(".")
