"""Whole runs over every category of a config: output folders, saved models, summaries.

Outputs go to ``<out>/<name>/<category>/`` (``report.json``, ``predictions.jsonl``,
``model/``, ``maps/``) and ``<out>/<name>/summary.json``. A run that fails half-way still
writes a summary saying which categories finished; reports of earlier runs are only ever
replaced by complete new ones (atomic writes).
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .artifacts import same_backbone
from .config import ExperimentConfig, config_hash, validate_config
from .data import load_splits
from .data.io import is_image_file
from .data.types import Split
from .engine import Progress, build_model, evaluate_split
from .errors import ConfigError, DataError, ModelError, OptionalDependencyError
from .legacy import upgrade_flat_keys
from .execution import Job, JobResult, LocalExecutor, failures, raise_failures
from .infer import load_for_runtime
from .optional import require
from .outputs.report.html import write_page
from .outputs.report.summary import write_summary_pages
from .outputs.files import check_writable, folder_lock, write_json
from .shards import export_on, shard_folder

if TYPE_CHECKING:  # export-maps --runtime onnx without a config must not import torch
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


def _saved_params(model) -> dict:
    fitted = getattr(model.detector, "params_", None)  # torch detector; the ONNX one keeps model.json's dict
    if fitted is not None:
        params = fitted.model_dump(mode="json")
    else:  # model.json of an earlier release may hold flat keys
        params = upgrade_flat_keys(None, model.detector.params)[0]
    return {k: v for k, v in params.items() if k not in ("seed", "category")}  # category: set per run


def _dotted(params: dict, prefix: str = "") -> dict:
    """Nested parameters as ``{"coreset.ratio": 0.1, ...}`` (what a user writes with --set)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_model(cfg: ExperimentConfig, model_arg: Path, category: str, runtime: str = "torch") -> Model:
    folder = find_model(model_arg, category)
    model = load_for_runtime(folder, runtime)
    if model.detector.name != cfg.detector.name:
        raise ModelError(f"{folder}: saved model is {model.detector.name!r} but the config asks for {cfg.detector.name!r}")
    # A saved model is used as fitted: refuse, rather than silently ignore, a config that differs.
    saved, asked = _dotted(_saved_params(model)), _dotted(cfg.detector.params)
    diff = sorted(k for k in set(saved) | set(asked) if saved.get(k) != asked.get(k))
    if "weights" in diff and _same_weights(model, asked.get("weights")):
        diff.remove("weights")  # another spelling (absolute, ../shared/...) of the same tensors
    if diff:
        raise ModelError(f"{folder}: saved with other detector.params ({', '.join(f'{k}={saved.get(k)!r}' for k in diff[:4])}) "
                         "than the config; refit with 'pyimgano fit' or use the same settings")
    if model.postprocess.config != cfg.postprocess:
        raise ModelError(f"{folder}: saved with another 'postprocess' section than the config; refit or use the same settings")
    return model


def _same_weights(model, weights) -> bool:
    """The config's weights give the saved backbone's tensors (sha256 of the tensors, not the path)."""
    if getattr(model.detector, "embedder", None) is None:
        return False  # the ONNX runtime's detector: no tensors to compare
    return same_backbone(model.detector, weights)


def _summary(cfg: ExperimentConfig, command: str, done: dict, status: str, error: str | None, t0: float) -> dict:
    means = {}
    for key in METRIC_KEYS:
        vals = [r["metrics"].get(key) for r in done.values() if r.get("metrics")]
        vals = [v for v in vals if v is not None]
        means[key] = float(np.mean(vals)) if vals else None
    return {"name": cfg.name, "command": command, "status": status, "error": error, "detector": cfg.detector.name,
            "categories": done, "mean": means, "total_s": time.perf_counter() - t0}


def check_outputs(out: Path, categories: list[str]) -> None:
    """Before any work: the run folder and each category folder can be written."""
    check_writable(out, "run folder")
    for name in categories:  # a file where a category folder must go fails now
        check_writable(out / name, "category folder")


def _loop(cfg: ExperimentConfig, out: Path, command: str, jobs: list[Job], executor=None, progress: Progress | None = None,
          skip=None, summary_name: str = "summary.json") -> dict:
    """Run one job per category through the executor; always leave a truthful summary file.

    ``skip(job)`` may return a finished result (``--resume``) so the job is not run again.
    """
    check_outputs(out, [j.name for j in jobs])
    t0 = time.perf_counter()
    kept = {i: r for i, j in enumerate(jobs) if skip and (r := skip(j)) is not None}
    ran = iter((executor or LocalExecutor()).run([j for i, j in enumerate(jobs) if i not in kept], progress))
    results = [kept[i] if i in kept else next(ran) for i in range(len(jobs))]
    summary = finish_run(cfg, out, command, results, t0, summary_name)
    raise_failures(results)
    return summary


def finish_run(cfg: ExperimentConfig, out: Path, command: str, results: list[JobResult], t0: float,
               summary_name: str = "summary.json") -> dict:
    """The run's summary: what finished, what failed (by name, with attempts), what was resumed."""
    done = {r.name: r.value for r in results if r.ok}
    failed = failures(results)
    summary = _summary(cfg, command, done, "failed" if failed else "ok", None, t0)
    summary.update(failed=failed, resumed=[r.name for r in results if r.resumed])
    if failed:
        summary["error"] = "; ".join(f"[{k}] {v['error']}" for k, v in failed.items())
    if done or not failed:
        write_json(out / summary_name, summary)
    return summary


def category_jobs(cfg: ExperimentConfig, fn, out: Path, **kwargs) -> list[Job]:
    """One job per category (plain data only: it may run on another machine); the whole
    dataset is checked here, before any work starts."""
    config = cfg.model_dump(mode="json")
    return [Job(s.name, fn, {"config": config, "category": s.name, "out": str(out), **kwargs}) for s in load_splits(cfg.dataset)]


def _job_inputs(config: dict, category: str) -> tuple[ExperimentConfig, Split]:
    """In a job (maybe on another machine): the validated config and this job's one split."""
    cfg = validate_config(config)
    ds = cfg.dataset
    category_field = ds.category if "category" in type(ds).model_fields else None
    if category_field == "all" or isinstance(category_field, list):
        ds = ds.model_copy(update={"category": category})  # list only this category's files
    for split in load_splits(ds):
        if split.name == category:
            return cfg, split
    raise DataError(f"category {category!r} not found in the dataset of {cfg.name}")


def fit_category(config: dict, category: str, out: str, progress: Progress | None = None) -> dict:
    cfg, split = _job_inputs(config, category)
    model, timing = build_model(cfg, split, progress)
    folder = model.save(Path(out) / split.name / "model")
    warnings = [model.thresholds.warning] if model.thresholds and model.thresholds.warning else []
    return {"model": str(folder), "timing": timing, "thresholds": model.thresholds.to_dict() if model.thresholds else None,
            "warnings": warnings}


def eval_category(config: dict, category: str, out: str, model_arg: str | None = None, progress: Progress | None = None) -> dict:
    cfg, split = _job_inputs(config, category)
    out = Path(out)
    if model_arg is not None:
        model, timing = _load_model(cfg, Path(model_arg), split.name), {"fit_s": 0.0, "loaded_from": str(model_arg)}
    else:
        model, timing = build_model(cfg, split, progress)
    report = evaluate_split(cfg, split, model, out / split.name, progress, timing)
    if cfg.output.html:
        write_page(out / split.name)
    return _entry(report, out / split.name / "report.json")


def _entry(report: dict, path: Path) -> dict:
    return {k: report.get(k) for k in ("metrics", "per_defect", "decisions", "counts", "timing", "warnings")} | {"report": str(path)}


def finished_report(job: Job) -> JobResult | None:
    """``--resume``: the job's report, if it exists, completed, with this config's hash."""
    path = Path(job.kwargs["out"]) / job.kwargs["category"] / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    want = config_hash(validate_config(job.kwargs["config"]))
    if report.get("status") != "ok" or report.get("config_hash") != want:
        return None
    return JobResult(job.name, _entry(report, path), resumed=True)


def fit_run(cfg: ExperimentConfig, out_root: Path | None = None, progress: Progress | None = None, executor=None) -> dict:
    from .model import check_target

    out = run_dir(cfg, out_root)
    jobs = category_jobs(cfg, fit_category, out)
    for job in jobs:
        check_target(out / job.name / "model")
    check_writable(out, "run folder")
    with folder_lock(out, "fit"):  # one fit per run folder at a time, as export-maps per output folder
        return _loop(cfg, out, "fit", jobs, executor, progress)


def eval_run(cfg: ExperimentConfig, out_root: Path | None = None, model_arg: Path | None = None,
             progress: Progress | None = None, executor=None, resume: bool = False) -> dict:
    out = run_dir(cfg, out_root)
    if cfg.output.html:  # before any work: the page's plots need matplotlib
        try:
            require("matplotlib", extra="report")
        except OptionalDependencyError as exc:
            raise OptionalDependencyError(f"{exc} (or set output.html: false)") from None
    jobs = category_jobs(cfg, eval_category, out, model_arg=str(model_arg) if model_arg is not None else None)
    summary = _loop(cfg, out, "eval", jobs, executor, progress, finished_report if resume else None)
    write_summary_pages(out, summary, cfg.output.html)
    return summary


def list_images(folder: Path) -> list[Path]:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--input must be a folder of images; {folder} is a file (put it in a folder of its own)")
    if not folder.is_dir():
        raise DataError(f"Input folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise DataError(f"No images (png, jpg, bmp, tif) found under {folder}")
    return images


def export_run(cfg: ExperimentConfig, out_root: Path | None = None, model_arg: Path | None = None,
               input_dir: Path | None = None, progress: Progress | None = None, runtime: str = "torch",
               executor=None, shard: tuple[int, int] | None = None) -> dict:
    """Maps for the test split of each category, or for every image under ``input_dir``.

    ``runtime="onnx"`` scores with the exported ONNX graph (needs ``model_arg``). Categories
    run one after another here; the scoring itself goes to ``executor`` (Ray: the images in
    shards, merged), or covers one ``shard`` (I, N) of the sorted image list."""
    out = run_dir(cfg, out_root)
    executor = executor or LocalExecutor()
    if runtime not in ("torch", "onnx"):
        raise ConfigError(f"--runtime must be torch or onnx, got {runtime!r}")
    if runtime == "onnx" and model_arg is None:
        raise ConfigError(f"--runtime {runtime} needs --model (a model folder exported with 'pyimgano export-onnx')")
    images = list_images(Path(input_dir)) if input_dir is not None else None
    if images is not None:
        check_not_inside(out, Path(input_dir))
    if images is not None and model_arg is not None:
        return export_folder_run(model_arg, input_dir, out_root or cfg.output.root, progress, runtime, cfg.name, executor, shard)
    splits = load_splits(cfg.dataset)
    if images is not None and len(splits) != 1:
        raise ConfigError(f"--input needs a config with one category (or --model); this one has {len(splits)}")

    def body(split: Split, progress: Progress | None = None) -> dict:
        folder = find_model(model_arg, split.name) if model_arg is not None else None
        model = _load_model(cfg, model_arg, split.name, runtime) if folder is not None else build_model(cfg, split, progress)[0]
        on = partial(export_on, executor, model, progress=progress, shard=shard, folder=folder, runtime=runtime)
        if images is not None:
            return on(images, out / split.name / "export", base=Path(input_dir))
        paths = [s.path for s in split.test]
        return on(paths, out / split.name / "maps", base=_common_root(paths))

    jobs = [Job(s.name, partial(body, s), {}) for s in splits]  # in this process (a closure, not shipped)
    # the fit runs here, at the executor's thread count (the shards' too): a local run then fits the same bank
    return _loop(cfg, out, "export-maps", jobs, LocalExecutor(executor.threads), progress, summary_name=_summary_name(shard))


def _summary_name(shard: tuple[int, int] | None) -> str:
    """N shard jobs of one folder run at once: each keeps its own run summary."""
    return EXPORT_SUMMARY if shard is None else EXPORT_SUMMARY.replace(".json", f".{shard_folder(*shard)}.json")


def export_folder_run(model_arg: Path, input_dir: Path, out_root: Path | None = None, progress: Progress | None = None,
                      runtime: str = "torch", name: str | None = None, executor=None, shard: tuple[int, int] | None = None) -> dict:
    """Maps for every image under ``input_dir`` with a saved model: no config, no dataset.

    Outputs go to ``<out_root>/<name>/<category>/export`` (``name``/``category``: the model's
    own unless given) and ``<out_root>/<name>/export_summary.json``. With ``runtime="onnx"``
    nothing here imports torch. ``executor``/``shard``: as :func:`export_run`.
    """
    folder = Path(model_arg) if (Path(model_arg) / "model.json").is_file() else _single_model(model_arg)
    images = list_images(Path(input_dir))
    model = load_for_runtime(folder, runtime)
    name = name or model.meta.get("name") or "export"
    category = model.meta.get("category") or "input"
    out = Path(out_root or "reports") / name
    check_not_inside(out / category / "export", Path(input_dir))
    check_writable(out / category / "export")
    summary = export_on(executor or LocalExecutor(), model, images, out / category / "export", progress, Path(input_dir),
                        shard, folder, runtime)
    result = {"name": name, "command": "export-maps", "status": "ok", "model": str(folder), "categories": {category: summary}}
    if summary.get("n_scored"):  # a run that scores nothing changes nothing
        write_json(out / _summary_name(shard), result)
    return result


def check_not_inside(out: Path, input_dir: Path) -> None:
    """Refuse an output folder inside the input folder: the next run would score our own overlays."""
    o, i = Path(out).resolve(), Path(input_dir).resolve()
    if o == i or i in o.parents:
        raise ConfigError(f"--out {out} is inside --input {input_dir}: the next run would score its own overlays and masks; "
                          "write the outputs outside the input folder")


def _single_model(model_arg: Path) -> Path:
    found = sorted(Path(model_arg).glob("*/model/model.json"))
    if len(found) != 1:
        raise ModelError(f"--model {model_arg}: expected one model folder (model.json), found {len(found)}")
    return found[0].parent


def _common_root(paths: list[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(Path(p).parent) for p in paths])) if paths else Path(".")
