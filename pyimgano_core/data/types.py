"""Sample and split types shared by every dataset layout."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is 0 for normal and 1 for anomalous. ``defect_type`` is ``"good"`` for
    normal images. ``mask_path`` is ``None`` for normal images (their mask is all
    background) and for anomalous images without a ground-truth mask, which are then
    excluded from pixel metrics (``has_pixel_gt`` is False).
    """

    path: Path
    label: int
    defect_type: str = GOOD
    mask_path: Path | None = None

    @property
    def has_pixel_gt(self) -> bool:
        return self.label == 0 or self.mask_path is not None


@dataclass
class Split:
    """The train (normal only, unless contaminated) and test samples of one category."""

    name: str
    train: list[Sample]
    test: list[Sample]
    mask_threshold: int = 127
    notes: dict = field(default_factory=dict)


def rel_path(path: Path, root: str | os.PathLike | None) -> str:
    """Posix path relative to ``root`` when inside it, else the absolute posix path."""
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()
