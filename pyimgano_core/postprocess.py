"""AnomalyMapPostprocess: what happens to anomaly maps between the detector and the metrics.

Map steps (change the values that pixel metrics see), in this order:

* ``normalize``: ``none`` (default); ``minmax`` / ``zscore`` with statistics of the held-out
  normal calibration maps (one global affine map for all images: pixel AUROC, AP and AUPRO
  are unchanged, only the scale becomes comparable across models); ``percentile``: per image,
  ``(m - p_lo) / (p_hi - p_lo)`` with that image's own percentiles (opt-in: it rescales every
  image separately, so it changes pixel AUROC/AP/AUPRO and hides how anomalous an image is).
* ``clip``: clamp to [lo, hi] after normalisation (values pushed to a bound become ties, which
  can only lower AUROC/AUPRO; useful for display and thresholds).
* ``blur_sigma``: an extra Gaussian blur at the original resolution (smooths noise; changes
  pixel metrics, usually slightly up for blotchy maps, down for thin defects).

Mask steps (only the binary defect masks made with the pixel threshold: they change pixel
F1/IoU and exported masks, never AUROC/AP/AUPRO): morphological ``open``/``close`` with a square
kernel, then removal of connected components smaller than ``min_area`` pixels.
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class PostprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    normalize: Literal["none", "minmax", "zscore", "percentile"] = "none"
    percentiles: tuple[float, float] = Field((1.0, 99.0), description="for normalize=percentile (per image)")
    clip: tuple[float, float] | None = None
    blur_sigma: float = Field(0.0, ge=0, le=100, description="extra Gaussian blur at original resolution (0 = off)")
    morphology: Literal["none", "open", "close"] = "none"
    kernel_size: int = Field(3, ge=1, description="square kernel for morphology")
    min_area: int = Field(0, ge=0, description="drop defect regions smaller than this many pixels (0 = keep all)")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {self.percentiles}")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError(f"clip must be [lo, hi] with lo < hi, got {self.clip}")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.normalize in ("minmax", "zscore")


class AnomalyMapPostprocess:
    """Apply a :class:`PostprocessConfig` to maps; ``fit`` learns global statistics from normal maps."""

    def __init__(self, config: PostprocessConfig):
        self.config = config

    def fit(self, normal_maps) -> "AnomalyMapPostprocess":
        """Learn the global statistics (minmax/zscore) from maps of held-out normal images."""
        values = np.concatenate([np.asarray(m, np.float32).ravel() for m in normal_maps])
        self.stats_ = {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()), "std": float(values.std())}
        return self

    def transform(self, amap: np.ndarray) -> np.ndarray:
        c = self.config
        m = np.asarray(amap, dtype=np.float32)
        if c.normalize == "minmax":
            s = self._stats()
            m = (m - s["min"]) / max(s["max"] - s["min"], 1e-12)
        elif c.normalize == "zscore":
            s = self._stats()
            m = (m - s["mean"]) / max(s["std"], 1e-12)
        elif c.normalize == "percentile":
            lo, hi = np.percentile(m, c.percentiles)
            m = (m - lo) / max(hi - lo, 1e-12)
        if c.clip is not None:
            m = np.clip(m, *c.clip)
        if c.blur_sigma > 0:
            r = int(4 * c.blur_sigma + 0.5)
            m = cv2.GaussianBlur(m, (2 * r + 1, 2 * r + 1), c.blur_sigma, borderType=cv2.BORDER_REFLECT)
        return m.astype(np.float32, copy=False)

    def binarize(self, amap: np.ndarray, threshold: float) -> np.ndarray:
        """Binary defect mask: ``map >= threshold``, then morphology and small-region removal."""
        c = self.config
        mask = (np.asarray(amap) >= threshold).astype(np.uint8)
        if c.morphology != "none":
            kernel = np.ones((c.kernel_size, c.kernel_size), np.uint8)
            op = cv2.MORPH_OPEN if c.morphology == "open" else cv2.MORPH_CLOSE
            mask = cv2.morphologyEx(mask, op, kernel)
        if c.min_area > 0:
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            keep = np.zeros(n, dtype=bool)
            keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= c.min_area
            mask = keep[labels].astype(np.uint8)
        return mask.astype(bool)

    def _stats(self) -> dict:
        if not hasattr(self, "stats_"):
            raise ValueError(f"normalize={self.config.normalize!r} needs statistics from normal calibration maps: call fit() first")
        return self.stats_

    def state(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "stats": getattr(self, "stats_", None)}

    @classmethod
    def from_state(cls, state: dict) -> "AnomalyMapPostprocess":
        obj = cls(PostprocessConfig.model_validate(state["config"]))
        if state.get("stats") is not None:
            obj.stats_ = dict(state["stats"])
        return obj
