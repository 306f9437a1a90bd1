"""The detector contract and the detector registry.

``Detector(**params)`` only stores parameters; ``fit(images) -> self`` learns state kept in
attributes ending in ``_``; ``predict(images) -> Prediction``. Higher score = more anomalous.
A detector never sees labels or masks. Images are paths or HxWx3 uint8 arrays.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import ConfigError, DataError, NotFittedError

MAX_SIDE = 8192  # pixels: larger model inputs are a typo, not a plan


class DetectorParams(BaseModel):
    """Base of every detector's parameter model: strict, typo-proof, finite numbers only.

    Sizes (``image_size``, ``crop``) must lie in 1..8192 pixels and ``blur_sigma`` in 0..100,
    so a typo fails here with one line instead of as an allocation failure after the fit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("image_size", "crop", check_fields=False)
    @classmethod
    def _pixel_sizes(cls, v):
        if isinstance(v, str):  # "auto" (where the field allows it): resolved from the images at fit time
            return v
        for x in ([v] if isinstance(v, int) else list(v or [])):
            if not 1 <= x <= MAX_SIDE:
                raise ValueError(f"must be between 1 and {MAX_SIDE} pixels, got {x}")
        return v

    @classmethod
    def upgrade(cls, data: dict) -> tuple[dict, list[str]]:
        """Parameters written for an earlier release rewritten to today's names, and one note per change."""
        return data, []

    @field_validator("blur_sigma", check_fields=False)
    @classmethod
    def _sigma(cls, v):
        if not 0 <= v <= 100:
            raise ValueError(f"must be between 0 and 100 (model-input pixels), got {v}")
        return v


@dataclass
class Prediction:
    """Scores and maps for a batch of images.

    ``scores``: float32 [N]. ``maps``: float32 [N, h, w] (or a list of [h_i, w_i] when input
    sizes differ), in model-input geometry, or ``None`` for image-level detectors.
    ``boxes``: float [N, 4], (y0, x0, y1, x1) of the original image each map covers.
    ``orig_hw``: int [N, 2], the original image sizes.
    ``errors``: images the detector could not score (index -> one-line reason, e.g. smaller than
    its patch grid); their rows hold a NaN score and a placeholder map. The other images of the
    batch are scored in the same pass (nothing is predicted twice).
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray] | None
    boxes: np.ndarray
    orig_hw: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class Detector:
    """Base class. Subclasses set ``name`` and ``Params`` and implement ``_fit``/``_predict``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[DetectorParams]] = DetectorParams

    def __init__(self, **params: Any):
        # Validation happens in fit(); the constructor only stores (sklearn convention).
        self.params = params

    # -- public API -------------------------------------------------------------------
    def fit(self, images: Sequence) -> "Detector":
        self.params_ = self.Params.model_validate(self.params)
        self.timing_: dict[str, float] = {}
        self._fit(list(images))
        return self

    def predict(self, images: Sequence, on_error: str = "raise") -> Prediction:
        """Score ``images``. An image the detector cannot use raises a :class:`DataError` carrying
        ``image_index`` (``on_error="raise"``), or is listed in ``Prediction.errors`` (``"report"``:
        the engine's way, so one bad image never costs the others a second pass)."""
        self.check_fitted()
        pred = self._predict(list(images))
        if pred.errors and on_error == "raise":
            first = min(pred.errors)
            exc = DataError(pred.errors[first])
            exc.image_index = first
            raise exc
        return pred

    def check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit() or load a saved model first.")

    # -- persistence: arrays + JSON, never pickle ----------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned state as (arrays, json-able extras). Override to add more."""
        self.check_fitted()
        return {}, {}

    def load_state(self, arrays: dict[str, np.ndarray], extras: dict[str, Any]) -> None:
        self.params_ = self.Params.model_validate(self.params)
        self.timing_ = {}

    # -- to implement -------------------------------------------------------------------
    def _fit(self, images: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, images: list) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"detector name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_detector_class(name: str) -> type[Detector]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown detector {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}."
        ) from None


def list_detectors(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_detector(name: str, **params: Any) -> Detector:
    return get_detector_class(name)(**params)


