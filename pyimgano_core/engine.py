"""The one split-evaluation engine: every CLI command (fit, eval, export-maps) runs through it.

    build_model:    split.train -> (holdout) -> detector.fit -> calibration -> Model
    score_stream:   images -> detector.predict in chunks -> maps back to original geometry
                    -> post-processing  (one pass per image; bounded memory)
    evaluate_split: score the test split -> metrics overall and per defect -> decisions -> report
    export_images:  score_stream over any images -> PNG/NPY maps, masks, predictions.jsonl

Writing is the outputs package's (outputs/): the engine decides what, outputs write it.
"""
from __future__ import annotations

import resource
import time
from collections import deque
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import cv2
import numpy as np

from . import metrics as M
from .calibration import fit_thresholds, split_holdout
from .config import ExperimentConfig, MetricsConfig, config_hash
from .data.io import read_image, read_mask
from .data.shots import describe_shots, select_shots
from .data.types import Split
from .errors import ConfigError, DataError
from .execution import current_threads
from .features.geometry import map_to_original
from .metrics_stream import PixelMetricStream
from .outputs.files import check_writable, folder_lock, write_json, write_jsonl
from .outputs.pictures import display_range, record_display_range, save_eval_maps
from .outputs.predictions import ExportWriter
from .outputs.report.collect import ReportCollector
from .outputs.report.versions import versions
from .postprocess import AnomalyMapPostprocess

if TYPE_CHECKING:  # importing the engine must not import torch (the ONNX runtime scores through it)
    from .model import Model

CHUNK = 16  # images per predict call: bounds memory, gives progress ticks
DECODE_WORKERS = 4  # threads decoding the next chunk while the model runs on this one


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


# ---------------------------------------------------------------------------------- evaluation
def evaluate_split(cfg: ExperimentConfig, split: Split, model: Model, out_dir: Path, progress: Progress | None = None,
                   fit_timing: dict | None = None) -> dict:
    """Score ``split.test`` once, then metrics -> decisions -> report, written to ``out_dir``.

    Maps are not kept in memory: each goes once to a temporary spill file (removed on any exit)
    and the exact pixel metrics are computed from it in a second pass (metrics_stream)."""
    t_start = time.perf_counter()
    labels = np.array([x.label for x in split.test])
    defects = np.array([x.defect_type for x in split.test])
    with PixelMetricStream() as pixels:
        collector = ReportCollector(cfg.metrics.aupro_fpr_limit)  # curves + worst cases for the report
        scored = score_test(split, model, cfg.metrics, pixels, collector, progress)
        t0 = time.perf_counter()
        metrics, per_defect = split_metrics(labels, defects, scored.scores, pixels, cfg.metrics)
        decisions = decide(model, labels, defects, scored, pixels) if model.thresholds else None
        metrics_s = time.perf_counter() - t0
        pages = collector.finish(split.test, labels, scored.scores, out_dir, display_range(model),
                                 model.thresholds.pixel if model.thresholds is not None else None)
        maps = None
        if cfg.output.save_maps and scored.owners:
            maps = save_eval_maps(model, split.test, scored.owners, scored.regions, pixels.read, scored.value_range,
                                  out_dir / "maps")
    timing = dict(fit_timing or {})
    timing.update(predict_s=scored.seconds, predict_s_per_image=scored.seconds / max(len(labels), 1), metrics_s=metrics_s,
                  predict_detail=scored.detail, report_collect_s=collector.seconds)
    timing["total_s"] = timing.get("fit_s", 0.0) + timing.get("calibration_s", 0.0) + time.perf_counter() - t_start
    timing["peak_rss_mb"] = peak_rss_mb()
    report = build_report(cfg, split, model, scored, metrics, per_defect, decisions, timing)
    report.update(maps=maps, **pages)  # curves (ROC/PR/PRO points) and worst cases, read by outputs.report.html
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", (
        {"path": str(x.path), "label": x.label, "defect_type": x.defect_type, "score": float(scored.scores[i]),
         **({"is_anomalous": bool(scored.scores[i] >= model.thresholds.image)} if model.thresholds else {})}
        for i, x in enumerate(split.test)))
    write_json(out_dir / "report.json", report)
    return report


@dataclass
class ScoredTest:
    """What one pass over the test split gives the later steps (no map is kept: they are in ``pixels``)."""

    scores: np.ndarray  # [N], test order
    owners: list[int] = field(default_factory=list)  # test images whose maps went to the pixel metrics, in order
    regions: list = field(default_factory=list)  # (region, original hw) of each
    covered: list[float] = field(default_factory=list)  # share of each image the model sees
    counts: dict | None = None  # pixel decisions at the threshold: tp, fp, fn, tn
    value_range: tuple[float, float] = (np.inf, -np.inf)  # of the evaluated maps
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)  # decode / embed / search / maps seconds


def score_test(split: Split, model: Model, opts: MetricsConfig, pixels: PixelMetricStream, collector: ReportCollector,
               progress: Progress | None = None) -> ScoredTest:
    """Step 1: score every test image once; stream its map with its mask to the pixel metrics."""
    samples = split.test
    out = ScoredTest(np.full(len(samples), np.nan, dtype=np.float64))
    thr_pixel = model.thresholds.pixel if model.thresholds else None
    out.counts = dict(tp=0, fp=0, fn=0, tn=0) if thr_pixel is not None else None
    lo, hi = np.inf, -np.inf
    t0 = time.perf_counter()
    for s in score_stream(model, [x.path for x in samples], progress, f"[{split.name}] scoring {len(samples)} test images",
                          timing=out.detail):
        if s.error:
            raise DataError(s.error)
        sample = samples[s.index]
        out.scores[s.index] = s.score
        if s.amap is None or not opts.pixel or not sample.has_pixel_gt:
            collector.add(s.index, sample.label, s.score, s.amap, None, s.region)
            continue
        out.covered.append(s.amap.size / (s.orig_hw[0] * s.orig_hw[1]))
        gt = _ground_truth(sample, s, split.mask_threshold)
        amap = s.amap
        if opts.resolution != "original":
            gt, amap = _downscale(gt, amap, int(opts.resolution))
        pixels.add(gt, amap, sample.defect_type)
        lo, hi = min(lo, float(amap.min())), max(hi, float(amap.max()))
        if out.counts is not None:
            for k, v in M.binary_stats(gt, model.postprocess.binarize(amap, thr_pixel)).items():
                if k in out.counts:
                    out.counts[k] += v
        out.owners.append(s.index)
        out.regions.append((s.region, s.orig_hw))
        collector.add(s.index, sample.label, s.score, amap, gt, s.region)
    out.value_range, out.seconds = (lo, hi), time.perf_counter() - t0
    return out


def _ground_truth(sample, s: Scored, mask_threshold: int) -> np.ndarray:
    """The sample's mask over the model's view of the image (all-normal when it has none)."""
    if sample.mask_path is None:
        return np.zeros(s.amap.shape, dtype=bool)
    full = read_mask(sample.mask_path, mask_threshold)
    if full.shape != s.orig_hw:
        raise DataError(f"mask {sample.mask_path} is {full.shape[1]}x{full.shape[0]} but image {sample.path} is "
                        f"{s.orig_hw[1]}x{s.orig_hw[0]}")
    return full[s.region]


def split_metrics(labels: np.ndarray, defects: np.ndarray, scores: np.ndarray, pixels: PixelMetricStream,
                  opts: MetricsConfig) -> tuple[dict, dict]:
    """Step 2: metrics over the whole test split, and per defect type (that type + the good images)."""
    metrics = compute_metrics(labels, scores, pixels, opts.aupro_fpr_limit)
    per_defect = {}
    if opts.per_defect:
        for d in sorted(set(defects.tolist()) - {"good"}):
            sel = (defects == "good") | (defects == d)
            per_defect[d] = {"n": int((defects == d).sum()),
                             **compute_metrics(labels[sel], scores[sel], pixels, opts.aupro_fpr_limit, {"good", d})}
    return metrics, per_defect


def decide(model: Model, labels: np.ndarray, defects: np.ndarray, scored: ScoredTest, pixels: PixelMetricStream) -> dict:
    """Step 3: image and pixel decisions at the calibrated thresholds, next to the oracle F1-max."""
    thr = model.thresholds
    pred = scored.scores >= thr.image
    out = {"thresholds": thr.to_dict(), "image": M.binary_stats(labels, pred)}
    good = defects == "good"
    out["image"]["test_good_fpr"] = float(pred[good].mean()) if good.any() else None
    if scored.counts is not None and scored.owners:
        out["pixel"] = M.stats_from_counts(**scored.counts)
    oracle = {"image_f1_max": _safe(lambda: M.f1_max(labels, scored.scores)[0])}
    if len(pixels):
        oracle["pixel_f1_max"] = _safe(lambda: pixels.f1_max()[0])
    out["oracle_f1_max_NOT_a_deployable_threshold"] = oracle
    return out


def build_report(cfg: ExperimentConfig, split: Split, model: Model, scored: ScoredTest, metrics: dict, per_defect: dict,
                 decisions: dict | None, timing: dict) -> dict:
    """Step 4: the report's content (written by the caller; its pages read it later)."""
    labels = np.array([x.label for x in split.test])
    defects = np.array([x.defect_type for x in split.test])
    return {
        "name": cfg.name, "category": split.name, "status": "ok", "detector": cfg.detector.name,
        "metrics": metrics, "per_defect": per_defect, "decisions": decisions,
        "counts": {"train": len(split.train), "fit": model.meta.get("n_fit_images"), "calibration_holdout": len(model.meta.get("holdout", [])),
                   "test": len(labels), "test_good": int((labels == 0).sum()), "test_anomalous": int((labels == 1).sum()),
                   "pixel_evaluated": len(scored.owners), "by_defect": {d: int((defects == d).sum()) for d in sorted(set(defects.tolist()))}},
        "timing": timing,
        "protocol": _protocol(cfg, split, model, scored),
        "notes": split.notes,
        "warnings": _warnings(split, model, metrics, cfg),
        "few_shot_images": model.meta.get("fit_images"),
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),  # --resume skips a run whose report has this hash
        "versions": versions(),
    }


def _protocol(cfg: ExperimentConfig, split: Split, model: Model, scored: ScoredTest) -> dict:
    """How the numbers were measured, stated with every report."""
    geometry = model.detector.geometry if hasattr(model.detector, "geometry") else None
    return {
        "model_input": geometry.describe() if geometry else None,
        "map_resolution": "original mask resolution" if cfg.metrics.resolution == "original" else f"longest side {cfg.metrics.resolution}",
        "evaluated_fraction_of_image": float(np.mean(scored.covered)) if scored.covered else None,
        "border_rule": ("pixels outside the model's (centre-cropped) view are not evaluated"
                        if geometry is not None and (geometry.crop or geometry.multiple)
                        else "the model sees the whole image (no crop): every pixel is evaluated"),
        "aupro": f"8-connected regions, exact, FPR limit {cfg.metrics.aupro_fpr_limit}, normalised by the limit",
        "mask_threshold": f"mask value > {split.mask_threshold}",
        "thresholds_from": "held-out normal training images" if model.thresholds else None,
        "few_shot": describe_shots(cfg.dataset.shots, cfg.seed, cfg.dataset.shots_protocol),
        "cpu_threads": current_threads(),  # float32 sums depend on it (execution.cpus_per_task pins it)
        **(model.detector.protocol() if hasattr(model.detector, "protocol") else {}),  # features, image score
    }


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


# ---------------------------------------------------------------------------------- export
def export_images(model: Model, images: Sequence[Path], out_dir: Path, progress: Progress | None = None,
                  base: Path | None = None) -> dict:
    """Score any images (no labels) and write, per image, an overlay PNG, the raw map (float16
    .npy), a binary defect mask PNG (when the model has thresholds) and one line of
    ``predictions.jsonl`` (:class:`~.outputs.predictions.ExportWriter`). Streams: memory does not
    grow with the number of images. An unreadable image is reported in the summary and skipped."""
    check_writable(out_dir)
    stream = score_stream(model, list(images), progress, f"exporting maps for {len(images)} images", keep_images=True)
    with folder_lock(out_dir, "export-maps"), ExportWriter(model, out_dir, base) as writer, closing(stream):
        for s in stream:  # closing: an interrupt stops the decoders here, not in a garbage-collected generator
            path = Path(images[s.index])
            if s.error:
                writer.fail(path, s.error)
            else:
                writer.add(s, path)
        return writer.finish(len(images), peak_rss_mb())
