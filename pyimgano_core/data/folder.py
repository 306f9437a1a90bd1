"""Custom data, way 2: a folder spec: globs for train/test images and a rule for masks."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import DataError
from .base import DatasetBase, abs_path, finish_split, rel_path, require_dir
from .io import is_image_file
from .types import GOOD, Sample, Split

Patterns = str | list[str]


class MaskSpec(BaseModel):
    """Where the mask of a defective image lives.

    Attributes
    ----------
    mode : {"mask_dir", "suffix", "same_folder_ext"}
        ``mask_dir``: ``<dir>/<stem><suffix><ext>``; ``suffix``: next to the image,
        ``<stem><suffix><ext>``; ``same_folder_ext``: next to the image, ``<stem><ext>``
        (Magnetic-tile: ``x.jpg`` + ``x.png``).
    dir : str or None
        For ``mask_dir``: folder relative to the dataset root; ``{defect}`` is
        replaced by the image's defect type.
    suffix : str
        Stem suffix for ``mask_dir`` and ``suffix`` modes.
    ext : str
        Mask file extension, with the dot.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["mask_dir", "suffix", "same_folder_ext"]
    dir: str | None = None
    suffix: str = "_mask"
    ext: str = ".png"

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "mask_dir":
            if not self.dir:
                raise ValueError("mask.dir is required when mask.mode is mask_dir")
            try:
                self.dir.format(defect="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"mask.dir may only use the {{defect}} placeholder ({exc})"
                ) from None
        if not self.ext.startswith("."):
            raise ValueError(f"mask.ext must start with a dot, got {self.ext!r}")
        return self

    def locate(self, img: Path, defect: str, root: Path) -> Path:
        if self.mode == "mask_dir":
            return (
                abs_path(self.dir.format(defect=defect), root)
                / f"{img.stem}{self.suffix}{self.ext}"
            )
        suffix = self.suffix if self.mode == "suffix" else ""
        return img.with_name(f"{img.stem}{suffix}{self.ext}")


class FolderConfig(DatasetBase):
    """``dataset: {type: folder, ...}``: images selected by globs under ``root``.

    Attributes
    ----------
    root : Path
        Dataset folder (relative to the working directory); globs are relative to it.
    category : str or None
        Split name; default: the root folder's name.
    train : str or list of str
        Glob(s) of normal training images (``**`` recurses). Only image files
        count, and a pattern that matches none is an error.
    test_normal : str, list of str or None
        Glob(s) of normal test images.
    test_fraction : float or None
        Without ``test_normal``: hold out this share of the ``train`` matches as
        normal test images, drawn with ``seed``.
    seed : int
        Seed of the hold-out draw.
    test_anomalous : str or list of str
        Glob(s) of defective test images.
    defect_type : str
        ``"parent"`` (folder name), ``"grandparent"`` (for ``MT_Crack/Imgs/x.jpg``:
        ``MT_Crack``) or a fixed name.
    defect_regex : str or None
        Overrides ``defect_type``: searched in the root-relative posix path; the
        group ``defect`` (or group 1, or the whole match) is the defect type.
    mask : MaskSpec or None
        Where masks are; ``None`` = no masks (then ``missing_mask: exclude``).
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects.
    """

    type: Literal["folder"] = "folder"
    root: Path
    category: str | None = None
    train: Patterns
    test_normal: Patterns | None = None
    test_fraction: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    test_anomalous: Patterns
    defect_type: str = Field("parent", min_length=1)
    defect_regex: str | None = None
    mask: MaskSpec | None = None
    mask_threshold: int = Field(127, ge=0, le=254)

    @field_validator("train", "test_normal", "test_anomalous")
    @classmethod
    def _relative(cls, v):
        for pattern in [v] if isinstance(v, str) else v or []:
            if not pattern or Path(pattern).is_absolute():
                raise ValueError(f"glob {pattern!r} must be non-empty and relative to root")
        if isinstance(v, list) and not v:
            raise ValueError("empty list of globs")
        return v

    @field_validator("defect_regex")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_test_normal_source(self):
        if self.test_normal is not None and self.test_fraction is not None:
            raise ValueError("set either test_normal or test_fraction, not both")
        return self


def _glob(root: Path, patterns: Patterns, field: str) -> list[Path]:
    found: set[Path] = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        hits = {p for p in root.glob(pattern) if p.is_file() and is_image_file(p)}
        if not hits:
            raise DataError(f"dataset.{field} glob {pattern!r} matches no image under {root}")
        found |= hits  # overlapping globs select a file once
    return sorted(found, key=str)


def _defect_of(cfg: FolderConfig, img: Path, root: Path) -> str:
    if cfg.defect_regex:
        rel = rel_path(img, root)
        m = re.search(cfg.defect_regex, rel)
        if not m:
            raise DataError(f"dataset.defect_regex {cfg.defect_regex!r} does not match {rel}")
        if "defect" in m.re.groupindex:
            return m.group("defect")
        return m.group(1) if m.re.groups else m.group(0)
    if cfg.defect_type == "parent":
        return img.parent.name
    if cfg.defect_type == "grandparent":
        return img.parent.parent.name
    return cfg.defect_type


def _disjoint(a: list[Path], b: list[Path], fa: str, fb: str) -> None:
    common = sorted(set(a) & set(b), key=str)
    if common:
        raise DataError(f"image {common[0]} is matched by both dataset.{fa} and dataset.{fb}")


def _orphan_masks(cfg: FolderConfig, test: list[Sample], images: set[Path]) -> list[Path]:
    """Mask-like files next to the used masks that belong to no selected image.

    Reported as a warning, not an error: a glob may select a subset on purpose.
    """
    used = {s.mask_path for s in test if s.mask_path is not None}
    suffix = "" if cfg.mask.mode == "same_folder_ext" else cfg.mask.suffix
    orphans = []
    for folder in sorted({m.parent for m in used}, key=str):
        for f in folder.glob(f"*{suffix}{cfg.mask.ext}"):
            if f not in used and f not in images and f.is_file():
                orphans.append(f)
    return sorted(orphans, key=str)


def load_folder(cfg: FolderConfig) -> list[Split]:
    """Load the single split a folder spec describes."""
    root = require_dir(abs_path(cfg.root), "dataset root")
    normals = _glob(root, cfg.train, "train")
    anomalous = _glob(root, cfg.test_anomalous, "test_anomalous")
    notes: dict = {}
    if cfg.test_normal is not None:
        test_normals = _glob(root, cfg.test_normal, "test_normal")
        _disjoint(normals, test_normals, "train", "test_normal")
    elif cfg.test_fraction is not None:
        n_test = int(round(cfg.test_fraction * len(normals)))
        if not 0 < n_test < len(normals):
            raise DataError(
                f"dataset.test_fraction={cfg.test_fraction} of {len(normals)} normal images "
                f"leaves {n_test} for testing and {len(normals) - n_test} for training"
            )
        # Permute the path-sorted list: the hold-out depends only on seed and files.
        held = set(np.random.default_rng(cfg.seed).permutation(len(normals))[:n_test].tolist())
        test_normals = [p for i, p in enumerate(normals) if i in held]
        normals = [p for i, p in enumerate(normals) if i not in held]
        notes["holdout"] = {
            "test_fraction": cfg.test_fraction,
            "seed": cfg.seed,
            "n_test_normal": n_test,
        }
    else:
        test_normals = []
    _disjoint(normals, anomalous, "train", "test_anomalous")
    _disjoint(test_normals, anomalous, "test_normal", "test_anomalous")

    images = set(normals) | set(test_normals) | set(anomalous)
    test = [Sample(p, 0, GOOD) for p in test_normals]
    for img in anomalous:
        defect = _defect_of(cfg, img, root)
        mask = None
        if cfg.mask is not None:
            path = cfg.mask.locate(img, defect, root)
            if path == img:
                raise DataError(
                    f"the mask of {img} would be the image itself: set dataset.mask.ext"
                )
            if path in images:
                raise DataError(
                    f"{path} is selected as an image but is the mask of {img}: narrow the globs"
                )
            mask = path if path.is_file() else None
        if mask is None and cfg.missing_mask == "error":
            expected = f"expected {path}" if cfg.mask is not None else "dataset.mask is not set"
            raise DataError(
                f"no mask for defective image {img} ({expected}); "
                "set dataset.missing_mask: exclude to keep it without pixel ground truth"
            )
        test.append(Sample(img, 1, defect, mask))

    warnings = []
    if cfg.mask is not None:
        orphans = _orphan_masks(cfg, test, images)
        if orphans:
            warnings.append(
                f"{len(orphans)} mask file(s) belong to no selected image, "
                f"e.g. {rel_path(orphans[0], root)}"
            )
    notes["warnings"] = warnings
    return [
        finish_split(
            cfg.category or root.name,
            [Sample(p, 0, GOOD) for p in normals],
            test,
            root=root,
            mask_threshold=cfg.mask_threshold,
            train_src=f"dataset.train {cfg.train!r} under {root}",
            test_src=f"dataset.test_* under {root}",
            notes=notes,
        )
    ]
