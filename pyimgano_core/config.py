"""Experiment configuration: strict pydantic models, YAML loading and ``--set`` overrides.

Every model forbids unknown keys, so a typo fails with its field path and the allowed names.
Detector parameters are validated by the detector's own parameter model. Relative paths are
resolved against the current working directory (run commands from the project root).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .data import DatasetConfig
from .config_file import read_config_file
from .errors import ConfigError
from .execution import ExecutionConfig
from .postprocess import PostprocessConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DetectorConfig(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class MetricsConfig(Strict):
    pixel: bool = Field(True, description="compute pixel AUROC/AP and AUPRO when masks exist")
    aupro_fpr_limit: float = Field(0.3, gt=0, le=1)
    resolution: Literal["original"] | int = Field(
        "original", description="'original': each mask at its own size; N: longest side downscaled to N (faster, coarser)"
    )
    per_defect: bool = True


class CalibrationConfig(Strict):
    """Thresholds from held-out normal images (never from the memory bank's own images)."""

    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="share of normal training images kept out of fitting")
    image_quantile: float = Field(0.99, gt=0, le=1, description="image threshold = this quantile of held-out scores")
    pixel_quantile: float = Field(0.999, gt=0, le=1, description="pixel threshold = this quantile of held-out map values")


class OutputConfig(Strict):
    root: Path = Path("reports")
    save_maps: bool = Field(False, description="eval also writes PNG heatmaps/overlays for the test images")
    html: bool = Field(True, description="eval also writes report.html per category (and index.html over categories)")


class ExperimentConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds every random choice (numpy needs 0 <= seed < 2**32)")
    dataset: DatasetConfig
    detector: DetectorConfig
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    calibration: CalibrationConfig | None = None
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    def detector_params(self, category: str | None = None) -> dict[str, Any]:
        """Validated detector parameters with defaults filled in, plus the experiment seed.

        Detectors whose parameters have a ``category`` field (per-category defaults, e.g.
        AnomalyDINO's ``masking: reference``) also get the dataset category being run.
        """
        from .detectors import get_detector_class  # the detectors import torch: only once the schema passed

        params = dict(self.detector.params, seed=self.seed)
        if category is not None and "category" in get_detector_class(self.detector.name).Params.model_fields:
            params["category"] = category
        return params


def config_hash(cfg: ExperimentConfig) -> str:
    """Fingerprint of everything that can change a run's results (not where it runs or writes)."""
    data = cfg.model_dump(mode="json", exclude={"execution": True, "output": {"root"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ loading
def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    # Scalars stay strings so pydantic coerces them to the field's type ("01" stays "01"
    # for a str field, "0.1" becomes 0.1 for a float); lists, dicts and null come from YAML.
    if value is not None and not isinstance(value, (list, dict)):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def _models_in(annotation) -> list[type[BaseModel]]:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _tag(model: type[BaseModel]) -> str | None:
    """The value a discriminated union selects ``model`` by (its one-value ``type`` / ``kind`` / ``method``)."""
    from typing import get_args

    for name in ("type", "kind", "method"):
        field = model.model_fields.get(name)
        values = get_args(field.annotation) if field is not None else ()
        if len(values) == 1 and isinstance(values[0], str):
            return values[0]
    return None


def _resolve(model: type[BaseModel] | None, loc: tuple) -> tuple[list[str], list[type[BaseModel]]]:
    """The user's path of an error location (union tags and pydantic's type tags dropped), and the models there."""
    candidates, path = ([model] if model else []), []
    for part in loc:
        if isinstance(part, str) and not any(part in m.model_fields for m in candidates):
            tagged = [m for m in candidates if _tag(m) == part]
            if tagged:  # discriminated union: the member the tag names
                candidates = tagged
                continue
            if _TYPE_LOC.match(part) or (not candidates and part in _TAGS):
                continue
        path.append(str(part))
        if isinstance(part, str):
            candidates = [sub for m in candidates if part in m.model_fields for sub in _models_in(m.model_fields[part].annotation)]
    return path, candidates


def format_validation_error(exc: ValidationError, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        parts, _ = _resolve(model, loc)
        path = ".".join([*map(str, prefix), *parts])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            _, there = _resolve(model, loc[:-1])
            names = sorted(set(there[0].model_fields) - ({"seed", "category"} if prefix and len(loc) == 1 else set())) \
                if len(there) == 1 else []
            msg = "unknown key" + (f"; allowed: {', '.join(names)}" if names else "")
        elif err["type"] == "union_tag_invalid":  # "kind 'annoy' must be one of 'exact', 'flat', ..."
            ctx = err.get("ctx", {})
            name = str(ctx.get("discriminator", "type")).strip("'").removeprefix("_").removesuffix("()")
            msg = f"{name} {ctx.get('tag')!r} must be one of {ctx.get('expected_tags')}"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
        line = f"{path or '<root>'}: {msg}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _union_tags() -> set[str]:
    from typing import get_args

    union = get_args(DatasetConfig)[0]
    return {t for m in get_args(union) for t in get_args(m.model_fields["type"].annotation)}


_TAGS = _union_tags()
_TYPE_LOC = re.compile(r"^(int|float|str|bool|none|list|dict|tuple|literal|function-\w+)(\[.*\])?$")


def validate_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a config dict (after overrides), including the detector's own parameters."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, model=ExperimentConfig)}") from None
    from .detectors import get_detector_class  # the detectors import torch: only once the schema passed

    cls = get_detector_class(cfg.detector.name)
    if "seed" in cfg.detector.params:
        raise ConfigError(f"{source}: detector.params.seed: set the top-level 'seed' instead")
    if "category" in cfg.detector.params:
        raise ConfigError(f"{source}: detector.params.category: set per run from dataset.category, not here")
    try:
        cfg.detector.params, notes = cls.Params.upgrade(dict(cfg.detector.params))
    except ValueError as exc:
        raise ConfigError(f"{source}: detector.params: {exc}") from None
    for note in notes:  # one line per earlier flat key (the CLI prints them)
        warnings.warn(note, FutureWarning, stacklevel=2)
    try:
        params = cls.Params.model_validate(cfg.detector_params())
    except ValidationError as exc:
        msg = format_validation_error(exc, ("detector", "params"), model=cls.Params)
        raise ConfigError(f"{source}: {msg}") from None
    problem = _geometry_problem(params)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    cfg.detector.params = {k: v for k, v in params.model_dump(mode="json").items() if k not in ("seed", "category")}
    return cfg


def _geometry_problem(params) -> str | None:
    """CNN patch-kNN taps and input size (detectors/geometry_check.py): a grid under 3x3, unknown taps."""
    from .detectors.geometry_check import check_cnn_geometry
    from .detectors.patchcore import CNNPatchParams

    return check_cnn_geometry(params) if isinstance(params, CNNPatchParams) else None


def load_config(path: str | Path, overrides: list[str] | None = None, data: Any = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key.path=value`` overrides and validate.

    ``data``: the file's parsed YAML when the caller has read it already (:func:`read_config_file`)."""
    path = Path(path)
    if data is None:
        data = read_config_file(path)
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides or []))
    return validate_config(data, str(path))
