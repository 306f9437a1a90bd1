"""The one split-evaluation engine: every CLI command (fit, eval, export-maps) runs through it.

    build_model:    split.train -> (holdout) -> detector.fit -> calibration -> Model
    score_stream:   images -> detector.predict in chunks -> maps back to original geometry
                    -> post-processing  (one pass per image; bounded memory)
    evaluate_split: score_stream over split.test -> metrics overall and per defect -> report
    export_images:  score_stream over any images -> PNG/NPY maps, masks, predictions.jsonl
                    (export.py: the writing side, on a writer pool)
"""
from __future__ import annotations

import resource
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import cv2
import numpy as np

from . import metrics as M
from .calibration import fit_thresholds, split_holdout
from .data.io import read_image, read_mask
from .data.shots import describe_shots, select_shots
from .data.types import Split
from .errors import ConfigError, DataError
from .execution import current_threads
from .features.geometry import map_to_original
from .metrics_stream import PixelMetricStream
from .reports import versions, write_json, write_jsonl
from .postprocess import AnomalyMapPostprocess

if TYPE_CHECKING:  # importing the engine must not import torch (the ONNX runtime scores through it)
    from .config import ExperimentConfig
    from .model import Model

CHUNK = 16  # images per predict call: bounds memory, gives progress ticks
DECODE_WORKERS = 4  # threads decoding the next chunk while the model runs on this one
WRITERS = 2  # threads encoding and writing export files


class Progress(Protocol):
    def start(self, description: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def stop(self) -> None: ...


class NullProgress:
    def start(self, description: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Scored:
    """One scored image: its map is at original resolution over ``region`` (the model's view)."""

    index: int
    score: float
    amap: np.ndarray | None
    region: tuple[slice, slice] | None
    orig_hw: tuple[int, int]
    error: str | None = None
    image: np.ndarray | None = None  # the decoded input (HxWx3 uint8 RGB), when asked for


class StageProgress:
    """Adapts a detector's ``fit_progress(stage, done, total)`` calls to a :class:`Progress` bar per stage."""

    def __init__(self, progress: Progress, prefix: str = ""):
        self.progress, self.prefix, self.stage, self.done = progress, prefix, None, 0

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != self.stage:
            self.progress.start(f"{self.prefix}{stage}", total)
            self.stage, self.done = stage, 0
        self.progress.advance(done - self.done)
        self.done = done


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------- fitting
def build_model(cfg: ExperimentConfig, split: Split, progress: Progress | None = None) -> tuple[Model, dict]:
    """Fit the configured detector on ``split.train`` (minus the calibration holdout)."""
    from .detectors import create_detector
    from .model import Model

    progress = progress or NullProgress()
    if cfg.postprocess.needs_calibration and cfg.calibration is None:
        raise ConfigError(f"postprocess.normalize={cfg.postprocess.normalize} needs a 'calibration' section (held-out normal images)")
    fit_samples, holdout = split.train, []
    if cfg.calibration is not None:
        fit_samples, holdout = split_holdout(split.train, cfg.calibration.holdout_fraction, cfg.seed)
    fit_samples = select_shots(fit_samples, cfg.dataset.shots, cfg.seed, cfg.dataset.shots_protocol)
    detector = create_detector(cfg.detector.name, **cfg.detector_params(split.name))
    # known total from the start: the detector's first stage (features) counts these images
    progress.start(f"[{split.name}] {cfg.detector.name}: extracting features of {len(fit_samples)} images", len(fit_samples))
    if hasattr(detector, "fit_progress"):  # stages with counts and an ETA (features, coreset)
        detector.fit_progress = StageProgress(progress, f"[{split.name}] {cfg.detector.name}: ")
    t0 = time.perf_counter()
    detector.fit([s.path for s in fit_samples])
    timing = {"fit_s": time.perf_counter() - t0, "fit_detail": dict(getattr(detector, "timing_", {}))}
    progress.stop()
    model = Model(detector, AnomalyMapPostprocess(cfg.postprocess), meta={
        "name": cfg.name, "category": split.name, "n_fit_images": len(fit_samples),
        "holdout": [str(s.path) for s in holdout],
        "fit_images": [str(s.path) for s in fit_samples] if cfg.dataset.shots else None,
    })
    if holdout:
        t0 = time.perf_counter()
        raw = list(score_stream(model, [s.path for s in holdout], progress, f"[{split.name}] calibrating", raw=True))
        _raise_first_error(raw)
        maps = [r.amap for r in raw if r.amap is not None]
        if cfg.postprocess.needs_calibration:
            model.postprocess.fit(maps)
        maps = [model.postprocess.transform(m) for m in maps]
        c = cfg.calibration
        model.thresholds = fit_thresholds(np.array([r.score for r in raw]), maps or None, c.image_quantile, c.pixel_quantile)
        timing["calibration_s"] = time.perf_counter() - t0
    else:  # no calibration: a fixed overlay scale from a few training images (in the memory bank: biased low)
        sample = fit_samples[:: max(1, len(fit_samples) // 8)][:8]
        raw = [r for r in score_stream(model, [s.path for s in sample], progress, f"[{split.name}] display scale", raw=True)
               if r.amap is not None and not r.error]
        from .export import record_display_range

        record_display_range(model, [model.postprocess.transform(r.amap) for r in raw],
                             f"{len(raw)} training images (they are in the memory bank, so the scale is biased low; calibrate for a fair one)")
    return model, timing


# ---------------------------------------------------------------------------------- scoring
def _decode(item) -> tuple[np.ndarray | None, str | None]:
    """An image as HxWx3 uint8 RGB, or the one-line reason it cannot be used (never raises)."""
    try:
        image = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item)
    except DataError as exc:
        return None, str(exc)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return None, f"images must be HxWx3 uint8 arrays or paths, got {image.dtype} {image.shape}"
    return image, None


def score_stream(model: Model, images: Sequence, progress: Progress | None = None, description: str = "scoring",
                 raw: bool = False, timing: dict | None = None, keep_images: bool = False) -> Iterator[Scored]:
    """Score images in chunks; yield each with its map at original resolution, post-processed.

    Images are decoded on a thread pool one chunk ahead (OpenCV releases the GIL), so decoding
    the next chunk overlaps the model's forward pass and search on this one; at most two chunks
    of decoded images are held. An unreadable image is yielded with ``error`` set and never
    reaches the model (each image is predicted exactly once). ``raw=True`` skips
    post-processing (calibration); ``keep_images=True`` passes the decoded image along.
    """
    progress = progress or NullProgress()
    progress.start(description, len(images))
    n = len(images)
    try:
        with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="pyimgano-decode") as pool:
            decoded = deque(pool.submit(_decode, images[i]) for i in range(min(n, CHUNK)))
            for start in range(0, n, CHUNK):
                t0 = time.perf_counter()
                chunk = [decoded.popleft().result() for _ in range(min(CHUNK, n - start))]
                waited = time.perf_counter() - t0  # decoding not hidden behind the previous chunk
                for i in range(start + CHUNK, min(n, start + 2 * CHUNK)):  # next chunk: decoded during predict
                    decoded.append(pool.submit(_decode, images[i]))
                ok = [j for j, (_, err) in enumerate(chunk) if err is None]
                pred = model.detector.predict([chunk[j][0] for j in ok], on_error="report") if ok else None
                # an image the model cannot use (e.g. smaller than its patch grid) fails alone, in the same pass
                for bad, msg in sorted(pred.errors.items()) if pred else ():
                    item = images[start + ok[bad]]
                    name = item if isinstance(item, (str, Path)) else f"#{start + ok[bad]}"
                    chunk[ok[bad]] = (None, msg.replace(f"image #{bad} ", f"image {name} "))
                if timing is not None:
                    timing["decode_wait_s"] = timing.get("decode_wait_s", 0.0) + waited
                    for k, v in (pred.timing.items() if pred else ()):
                        timing[k] = timing.get(k, 0.0) + v
                row = {j: r for r, j in enumerate(ok)}  # chunk position -> row of the prediction
                for j, (image, err) in enumerate(chunk):
                    if err is not None:
                        yield Scored(start + j, float("nan"), None, None, (0, 0), error=err)
                        continue
                    r = row[j]
                    hw = (int(pred.orig_hw[r][0]), int(pred.orig_hw[r][1]))
                    amap = region = None
                    if pred.maps is not None:
                        amap, region = map_to_original(pred.maps[r], hw, pred.boxes[r])
                        if not raw:
                            amap = model.postprocess.transform(amap)
                    yield Scored(start + j, float(pred.scores[r]), amap, region, hw, image=image if keep_images else None)
                del chunk, pred
                progress.advance(min(CHUNK, n - start))
    finally:
        progress.stop()


def _raise_first_error(scored: list[Scored]) -> None:
    for s in scored:
        if s.error:
            raise DataError(s.error)


def _downscale(mask: np.ndarray, amap: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    scale = longest / max(h, w)
    if scale >= 1:
        return mask, amap
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool),
            cv2.resize(amap, size, interpolation=cv2.INTER_AREA))


# ---------------------------------------------------------------------------------- metrics
def _safe(fn, *args, **kw):
    """A metric, or None when it is undefined for these labels (e.g. one class only)."""
    try:
        return float(fn(*args, **kw))
    except ValueError:
        return None


def compute_metrics(labels: np.ndarray, scores: np.ndarray, pixels: PixelMetricStream | None, fpr_limit: float,
                    groups: set[str] | None = None) -> dict:
    """Image metrics, and pixel metrics over the streamed maps of ``groups`` (None: all)."""
    out = {"image_auroc": _safe(M.image_auroc, labels, scores), "image_ap": _safe(M.image_ap, labels, scores)}
    if pixels is not None and len(pixels):
        try:
            out.update(pixels.metrics(fpr_limit, groups))
        except ValueError:
            out.update(pixel_auroc=None, pixel_ap=None, aupro=None)
    return out


def _decision_metrics(model: Model, labels, scores, defects, pixels: PixelMetricStream | None, pixel_counts) -> dict:
    """Image/pixel decisions at the calibrated thresholds, next to the oracle F1-max."""
    thr = model.thresholds
    pred = scores >= thr.image
    out = {"thresholds": thr.to_dict(), "image": M.binary_stats(labels, pred)}
    good = defects == "good"
    out["image"]["test_good_fpr"] = float(pred[good].mean()) if good.any() else None
    if pixel_counts is not None:
        out["pixel"] = M.stats_from_counts(**pixel_counts)
    oracle = {"image_f1_max": _safe(lambda: M.f1_max(labels, scores)[0])}
    if pixels is not None and len(pixels):
        oracle["pixel_f1_max"] = _safe(lambda: pixels.f1_max()[0])
    out["oracle_f1_max_NOT_a_deployable_threshold"] = oracle
    return out


# ---------------------------------------------------------------------------------- evaluation
def evaluate_split(cfg: ExperimentConfig, split: Split, model: Model, out_dir: Path, progress: Progress | None = None,
                   fit_timing: dict | None = None) -> dict:
    """Score ``split.test`` once, compute metrics overall and per defect type, write the report.

    Maps are not kept in memory: each goes once to a temporary spill file (removed on any exit)
    and the exact pixel metrics are computed from it in a second pass (metrics_stream)."""
    with PixelMetricStream() as pixels:
        return _evaluate(cfg, split, model, out_dir, progress, fit_timing, pixels)


def _evaluate(cfg, split, model, out_dir, progress, fit_timing, pixels: PixelMetricStream) -> dict:
    from .config import config_hash
    from .reporting.collect import ReportCollector

    t_start = time.perf_counter()
    collector = ReportCollector(cfg.metrics.aupro_fpr_limit)  # curves + worst cases for the report
    samples = split.test
    n = len(samples)
    scores = np.full(n, np.nan, dtype=np.float64)
    pix_owner, pix_region, covered, detail = [], [], [], {}
    thr_pixel = model.thresholds.pixel if model.thresholds else None
    counts = dict(tp=0, fp=0, fn=0, tn=0) if thr_pixel is not None else None
    lo, hi = np.inf, -np.inf
    t0 = time.perf_counter()
    for s in score_stream(model, [x.path for x in samples], progress, f"[{split.name}] scoring {n} test images", timing=detail):
        if s.error:
            raise DataError(s.error)
        sample = samples[s.index]
        scores[s.index] = s.score
        if s.amap is None or not cfg.metrics.pixel or not sample.has_pixel_gt:
            collector.add(s.index, sample.label, s.score, s.amap, None, s.region)
            continue
        covered.append(s.amap.size / (s.orig_hw[0] * s.orig_hw[1]))
        if sample.mask_path is None:
            gt = np.zeros(s.amap.shape, dtype=bool)
        else:
            full = read_mask(sample.mask_path, split.mask_threshold)
            if full.shape != s.orig_hw:
                raise DataError(f"mask {sample.mask_path} is {full.shape[1]}x{full.shape[0]} but image {sample.path} is {s.orig_hw[1]}x{s.orig_hw[0]}")
            gt = full[s.region]
        amap = s.amap
        if cfg.metrics.resolution != "original":
            gt, amap = _downscale(gt, amap, int(cfg.metrics.resolution))
        pixels.add(gt, amap, sample.defect_type)
        lo, hi = min(lo, float(amap.min())), max(hi, float(amap.max()))
        if counts is not None:
            for k, v in M.binary_stats(gt, model.postprocess.binarize(amap, thr_pixel)).items():
                if k in counts:
                    counts[k] += v
        pix_owner.append(s.index)
        pix_region.append((s.region, s.orig_hw))
        collector.add(s.index, sample.label, s.score, amap, gt, s.region)
    predict_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = np.array([x.label for x in samples])
    defects = np.array([x.defect_type for x in samples])
    fpr_limit = cfg.metrics.aupro_fpr_limit
    metrics = compute_metrics(labels, scores, pixels, fpr_limit)
    per_defect = {}
    if cfg.metrics.per_defect:
        for d in sorted(set(defects.tolist()) - {"good"}):
            sel = (defects == "good") | (defects == d)
            per_defect[d] = {"n": int((defects == d).sum()), **compute_metrics(labels[sel], scores[sel], pixels, fpr_limit, {"good", d})}
    decisions = _decision_metrics(model, labels, scores, defects, pixels, counts if pix_owner else None) if model.thresholds else None
    metrics_s = time.perf_counter() - t0

    from .export import _display_range, _save_eval_maps

    report_parts = collector.finish(samples, labels, scores, out_dir, _display_range(model),
                                    model.thresholds.pixel if model.thresholds is not None else None)
    maps_written = None
    if cfg.output.save_maps and pix_owner:
        maps_written = _save_eval_maps(model, samples, pix_owner, pix_region, pixels, (lo, hi), out_dir / "maps")

    timing = dict(fit_timing or {})
    timing.update(predict_s=predict_s, predict_s_per_image=predict_s / max(n, 1), metrics_s=metrics_s,
                  predict_detail=detail, report_collect_s=collector.seconds)
    timing["total_s"] = timing.get("fit_s", 0.0) + timing.get("calibration_s", 0.0) + time.perf_counter() - t_start
    timing["peak_rss_mb"] = peak_rss_mb()
    geometry = getattr(model.detector, "geometry", None)
    report = {
        "name": cfg.name, "category": split.name, "status": "ok", "detector": cfg.detector.name,
        "metrics": metrics, "per_defect": per_defect, "decisions": decisions,
        "counts": {"train": len(split.train), "fit": model.meta.get("n_fit_images"), "calibration_holdout": len(model.meta.get("holdout", [])),
                   "test": n, "test_good": int((labels == 0).sum()), "test_anomalous": int((labels == 1).sum()),
                   "pixel_evaluated": len(pix_owner), "by_defect": {d: int((defects == d).sum()) for d in sorted(set(defects.tolist()))}},
        "timing": timing,
        "protocol": {
            "model_input": geometry.describe() if geometry else None,
            "map_resolution": "original mask resolution" if cfg.metrics.resolution == "original" else f"longest side {cfg.metrics.resolution}",
            "evaluated_fraction_of_image": float(np.mean(covered)) if covered else None,
            "border_rule": ("pixels outside the model's (centre-cropped) view are not evaluated" if getattr(geometry, "crop", None)
                            or getattr(geometry, "multiple", None) else "the model sees the whole image (no crop): every pixel is evaluated"),
            "aupro": f"8-connected regions, exact, FPR limit {fpr_limit}, normalised by the limit",
            "mask_threshold": f"mask value > {split.mask_threshold}",
            "thresholds_from": "held-out normal training images" if model.thresholds else None,
            "few_shot": describe_shots(cfg.dataset.shots, cfg.seed, cfg.dataset.shots_protocol),
            "cpu_threads": current_threads(),  # float32 sums depend on it (execution.cpus_per_task pins it)
            **(model.detector.protocol() if hasattr(model.detector, "protocol") else {}),  # features, image score
        },
        "notes": split.notes,
        "warnings": _warnings(split, model, metrics, cfg),
        "few_shot_images": model.meta.get("fit_images"),
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),  # --resume skips a run whose report has this hash
        "versions": versions(),
        "maps": maps_written,
        **report_parts,  # curves (ROC/PR/PRO points) and worst cases, read by reporting.html
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", (
        {"path": str(x.path), "label": x.label, "defect_type": x.defect_type, "score": float(scores[i]),
         **({"is_anomalous": bool(scores[i] >= model.thresholds.image)} if model.thresholds else {})}
        for i, x in enumerate(samples)))
    write_json(out_dir / "report.json", report)
    return report


def _warnings(split: Split, model: Model, metrics: dict, cfg: ExperimentConfig) -> list[str]:
    """Everything a user should act on, each with its fix (the CLI prints them once)."""
    out = list(split.notes.get("warnings", []))
    if model.thresholds is not None and model.thresholds.warning:
        out.append(model.thresholds.warning)
    has_both = len({s.label for s in split.test}) == 2
    if has_both and metrics.get("image_auroc") is None:
        out.append("image AUROC is undefined: the scores are not finite; refit the model")
    if cfg.metrics.pixel and "pixel_auroc" in metrics and metrics["pixel_auroc"] is None and has_both \
            and not split.notes.get("empty_masks"):  # (empty masks already warned, with the same fix)
        out.append("pixel metrics are undefined: no defect pixel in any evaluated mask; "
                   "if the masks are stored as 0/1, set dataset.mask_threshold: 0")
    elif cfg.metrics.pixel and "pixel_auroc" not in metrics and any(s.label for s in split.test):
        out.append("pixel metrics were not computed: no masks, or the detector gives no maps")
    return list(dict.fromkeys(out))


def export_images(model: Model, images: Sequence[Path], out_dir: Path, progress: Progress | None = None,
                  base: Path | None = None) -> dict:
    """Score any images (no labels) and write their maps and predictions: see :func:`export.export_images`."""
    from .export import export_images as _export

    return _export(model, images, out_dir, progress, base)
