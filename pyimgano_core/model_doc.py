"""``model.json``: its schema and its own sha256, checked on load before any work.

A model folder's arrays are checked (finite, shaped as the parameters say) and its backbone
tensors carry a sha256; this does the same for ``model.json`` itself. :func:`seal` records the
sha256 of the document's canonical JSON (sorted keys, no whitespace, without the ``sha256``
key itself) under ``model_json_sha256``; :func:`check_doc` validates types, finiteness and
ranges and :func:`check_sha` compares that hash, so a hand-edited threshold is refused in one line (exit 4).
Folders written before the hash existed (pyimgano 85eb923 and earlier) have none: they are
validated and accepted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ModelError

HASH_KEY = "model_json_sha256"


class _Loose(BaseModel):  # finite numbers of the right type; unknown keys allowed (newer writers)
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _Thresholds(_Loose):
    image: float = Field(ge=0)  # every detector's scores are distances or other non-negative values
    pixel: Optional[float] = Field(None, ge=0)
    image_quantile: float = Field(gt=0, le=1)
    pixel_quantile: float = Field(gt=0, le=1)
    n_images: int = Field(ge=1)
    pixel_median: Optional[float] = Field(None, ge=0)
    method: str = "quantile"
    image_rank: Optional[int] = Field(None, ge=1)
    expected_fpr: Optional[float] = Field(None, ge=0, le=1)
    fpr_upper_95: Optional[float] = Field(None, ge=0, le=1)
    warning: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.image_rank is not None and self.image_rank > self.n_images:
            raise ValueError(f"image_rank {self.image_rank} is more than n_images {self.n_images}")
        if self.pixel is not None and self.pixel_median is not None and self.pixel_median > self.pixel:
            raise ValueError(f"pixel_median {self.pixel_median} is above the pixel threshold {self.pixel} "
                             "(a median of the values the threshold is a high quantile of)")
        return self


class _DisplayRange(_Loose):
    lo: float
    hi: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.hi > self.lo:
            raise ValueError(f"hi {self.hi} must be above lo {self.lo}")
        return self


class _Meta(_Loose):
    display_range: Optional[_DisplayRange] = None


class _Backbone(_Loose):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n_tensors: int = Field(ge=1)
    n_values: int = Field(ge=1)


class ModelDoc(_Loose):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    format_version: int
    pyimgano_version: str
    detector: str
    params: dict[str, Any]
    state: dict[str, Any]
    backbone: Optional[_Backbone] = None
    postprocess: dict[str, Any]
    thresholds: Optional[_Thresholds] = None
    meta: _Meta = Field(default_factory=_Meta)
    onnx: Optional[dict[str, Any]] = None  # export-onnx's graph section (deploy/onnx_export.py)
    int8: Optional[dict[str, Any]] = None  # pyimgano quantize's int8 graph section (deploy/quantize.py)
    model_json_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")


def doc_sha256(doc: dict) -> str:
    """sha256 of the document's canonical JSON, without its own hash."""
    body = {k: v for k, v in doc.items() if k != HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def seal(doc: dict) -> dict:
    """``doc`` with its sha256 recorded (computed on its JSON form, as it will be read back)."""
    body = json.loads(json.dumps({k: v for k, v in doc.items() if k != HASH_KEY}))
    return {**body, HASH_KEY: doc_sha256(body)}


def check_doc(doc: Any, path: Path) -> dict:
    """Validate a parsed model.json's schema (else one-line :class:`ModelError`); returns it unchanged."""
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    try:
        ModelDoc.model_validate(doc)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg'].removeprefix('Value error, ')}"
                         + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
                         for e in exc.errors()[:3])
        raise ModelError(f"{path}: invalid model.json: {errs}") from None
    return doc


def check_sha(doc: dict, path: Path) -> None:
    """The recorded sha256 must match (folders from before it was recorded have none: accepted).
    Loaders call this after their own, more specific checks, still before any work."""
    want = doc.get(HASH_KEY)
    if want is not None and doc_sha256(doc) != want:
        raise ModelError(f"{path}: sha256 {doc_sha256(doc)[:12]}... does not match the {want[:12]}... recorded in it: "
                         "model.json was edited after it was saved; refit (or restore the file)")


def read_model_json(path: Path) -> dict:
    """Read ``model.json`` and check its schema (one-line ModelError for unreadable or invalid files)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model.json ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ModelError(f"{path}: invalid model.json: {str(exc).splitlines()[0]}") from None
    return check_doc(doc, Path(path))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")
