"""Shared pieces of the dataset loaders: config base, folder listing, validation.

Every loader ends in :func:`finish_split`, so the checks a user relies on (empty
splits, duplicate stems, mask/image size, empty masks, missing masks) behave the
same for every layout. Validation reads headers and masks only; images are never
decoded here.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataError
from .contamination import Contamination
from .io import image_size, is_image_file, read_mask
from .types import GOOD, Sample, Split, rel_path  # noqa: F401  (rel_path: re-exported)


class DatasetBase(BaseModel):
    """Fields common to every ``dataset:`` config.

    Attributes
    ----------
    contamination : Contamination or None
        SoftPatch contaminated-training protocol; ``None`` = clean training set.
    missing_mask : {"error", "exclude"}
        A defective test image without a mask file: fail naming it, or keep it
        without pixel ground truth (``mask_path=None``; it still counts for image
        metrics) and list it in ``notes["missing_masks"]``.
    shots : int or None
        Few-shot protocol: the detector is fitted on ``shots`` training images chosen
        with the experiment's top-level ``seed`` (see :mod:`.shots`).
    shots_protocol : {"reference", "random"}
        ``reference``: AnomalyDINO's deterministic slice ``sorted(names)[seed*k:(seed+1)*k]``;
        ``random``: ``k`` images drawn at random with the seed.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    contamination: Contamination | None = None
    missing_mask: Literal["error", "exclude"] = "error"
    shots: int | None = Field(None, ge=1, description="few-shot: fit on this many training images, chosen with the top-level seed")
    shots_protocol: Literal["reference", "random"] = Field(
        "reference", description="reference: sorted training images [seed*k:(seed+1)*k] (AnomalyDINO's code); random: a seeded draw")


# --------------------------------------------------------------------------- paths


def abs_path(path: str | os.PathLike, base: Path | None = None) -> Path:
    """Absolute path without resolving symlinks; relative to ``base`` or the CWD."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (base if base is not None else Path.cwd()) / p
    return Path(os.path.normpath(p))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{what} {path} {state}")
    return path


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted; other files are ignored."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def resolve_categories(
    root: Path, category: str | list[str], is_category: Callable[[Path], bool], kind: str
) -> list[str]:
    """Expand ``"all"`` and check that named categories exist under ``root``.

    A named folder that exists but is incomplete is accepted here so that the
    loader can name the exact sub-folder that is missing.
    """
    require_dir(root, f"{kind} root")
    available = [p.name for p in subdirs(root) if is_category(p)]
    names = [category] if isinstance(category, str) else list(category)
    hint = "; root looks like a category folder itself: use its parent" if is_category(root) else ""
    if names == ["all"]:
        if not available:
            raise DataError(f"{kind} root {root} contains no category folders{hint}")
        return available
    for name in names:
        if not (root / name).is_dir():
            listed = ", ".join(available) or "none"
            raise DataError(
                f"{kind} category '{name}' not found under {root}; available: {listed}{hint}"
            )
    return sorted(set(names))


def find_mask(image: Path, candidates: list[Path], cfg: DatasetBase) -> Path | None:
    """The one existing mask among ``candidates`` (``None`` when allowed to be missing)."""
    found = [c for c in candidates if c.is_file()]
    if len(found) > 1:
        raise DataError(f"ambiguous masks for {image}: {found[0]} and {found[1]}")
    if found:
        return found[0]
    if cfg.missing_mask == "error":
        raise DataError(
            f"no mask for defective image {image} (expected {candidates[0]}); "
            "set dataset.missing_mask: exclude to keep it without pixel ground truth"
        )
    return None


# ------------------------------------------------------------------- validation


def check_duplicate_stems(samples: Iterable[Sample], split: str) -> None:
    """Two files of one folder and defect type with the same stem (``x.png``, ``x.jpg``).

    Exported maps and per-image records are keyed by defect type and stem, so the
    second file would overwrite the first.
    """
    seen: dict[tuple, Path] = {}
    for s in samples:
        key = (s.defect_type, s.path.parent, s.path.stem)
        if key in seen:
            raise DataError(f"duplicate {split} image stem: {seen[key]} and {s.path}")
        seen[key] = s.path


def _mask_check(sample: Sample, threshold: int) -> bool:
    """Decode one mask, compare its size with the image header; True when empty."""
    mask = read_mask(sample.mask_path, threshold)
    h, w = image_size(sample.path)
    if mask.shape != (h, w):
        mh, mw = mask.shape
        raise DataError(
            f"mask {sample.mask_path} is {mh}x{mw} (HxW) but image {sample.path} is {h}x{w}"
        )
    return not bool(mask.any())


def check_masks(samples: list[Sample], threshold: int) -> list[Sample]:
    """Check mask sizes and return the samples whose mask has no defect pixel.

    Masks are decoded (they are small one-channel files) because only the pixels
    tell whether a mask is empty; threads overlap the I/O and OpenCV's decoding.
    """
    with_mask = [s for s in samples if s.mask_path is not None]
    if not with_mask:
        return []
    workers = min(8, os.cpu_count() or 1, len(with_mask))
    with ThreadPoolExecutor(workers) as pool:
        empty = list(pool.map(lambda s: _mask_check(s, threshold), with_mask))
    return [s for s, e in zip(with_mask, empty, strict=True) if e]


def finish_split(
    name: str,
    train: list[Sample],
    test: list[Sample],
    *,
    root: Path,
    mask_threshold: int,
    train_src: str,
    test_src: str,
    notes: dict | None = None,
) -> Split:
    """Validate the samples of one category and build its :class:`Split`.

    Parameters
    ----------
    name : str
        Category name (the split's name).
    train, test : list of Sample
        Samples as found; masks of missing files already resolved to ``None``
        according to ``missing_mask``.
    root : Path
        Folder that paths recorded in ``notes`` are relative to.
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects.
    train_src, test_src : str
        Where the samples came from, for the "empty split" messages.
    notes : dict, optional
        Layout-specific notes to start from (``warnings`` is extended).

    Returns
    -------
    Split
        Samples sorted by path; ``notes`` holds ``root``, ``warnings`` and, when
        non-empty, ``empty_masks`` / ``missing_masks`` (relative image paths).
    """
    if not train:
        raise DataError(f"category {name}: no training images in {train_src}")
    if not test:
        raise DataError(f"category {name}: no test images in {test_src}")
    check_duplicate_stems(train, "training")
    check_duplicate_stems(test, "test")
    notes = dict(notes or {})
    warnings = list(notes.get("warnings", []))
    notes["root"] = root.as_posix()

    anomalous = [s for s in test if s.label == 1]
    missing = [s for s in anomalous if s.mask_path is None]
    if missing:
        notes["missing_masks"] = sorted(rel_path(s.path, root) for s in missing)
        warnings.append(
            f"{len(missing)} defective test image(s) have no mask: kept for image "
            "metrics, excluded from pixel metrics"
        )
    empty = check_masks(anomalous, mask_threshold)
    if empty:
        notes["empty_masks"] = sorted(rel_path(s.path, root) for s in empty)
        warnings.append(
            f"{len(empty)} defective test image(s) have an empty mask (no pixel > "
            f"{mask_threshold}): kept; they add only background pixels to pixel "
            "AUROC/AP and no region to AUPRO. If the masks are stored as 0/1, set "
            "dataset.mask_threshold: 0"
        )
    if not anomalous:
        warnings.append("test split has no defective images: image AUROC/AP and pixel metrics are undefined; "
                        "add defective test images (with masks) to measure detection")
    if len(anomalous) == len(test):
        warnings.append("test split has no normal images: image AUROC is undefined; add good test images")
    notes["warnings"] = warnings
    return Split(
        name=name,
        train=sorted(train, key=lambda s: str(s.path)),
        test=sorted(test, key=lambda s: str(s.path)),
        mask_threshold=mask_threshold,
        notes=notes,
    )


# ---------------------------------------------------------------- folder trees


def load_tree(
    cat_dir: Path,
    cfg: DatasetBase,
    *,
    kind: str,
    normal: str,
    mask_names: Callable[[str], list[str]],
    mask_threshold: int,
    notes: dict | None = None,
) -> Split:
    """Load ``train/<normal>``, ``test/<type>/``, ``ground_truth/<type>/`` trees.

    Shared by MVTec AD (``good``, ``<stem>_mask.png``), preprocessed VisA
    (``good``, ``<stem>.png``) and BTAD (``ok``, ``<stem>.png|.bmp``).

    Parameters
    ----------
    cat_dir : Path
        The category folder.
    cfg : DatasetBase
        The dataset config (``missing_mask`` policy).
    kind : str
        Layout name used in messages.
    normal : str
        Name of the normal sub-folder in ``train/`` and ``test/``.
    mask_names : callable
        Maps an image stem to the accepted mask file names, preferred first.
    mask_threshold : int
        Threshold stored in the split.
    notes : dict, optional
        Initial notes.
    """
    train_dir = require_dir(cat_dir / "train" / normal, f"{kind} training folder")
    test_dir = require_dir(cat_dir / "test", f"{kind} test folder")
    gt_dir = cat_dir / "ground_truth"
    train = [Sample(p, 0) for p in list_images(train_dir)]
    test: list[Sample] = []
    expected: dict[str, set[str]] = defaultdict(set)  # defect -> mask names in use
    for folder in subdirs(test_dir):
        for img in list_images(folder):
            if folder.name == normal:
                test.append(Sample(img, 0, GOOD))
                continue
            names = mask_names(img.stem)
            expected[folder.name].update(names)
            mask = find_mask(img, [gt_dir / folder.name / n for n in names], cfg)
            test.append(Sample(img, 1, folder.name, mask))
    if gt_dir.is_dir():
        for folder in subdirs(gt_dir):
            if folder.name == normal:  # masks of normal images carry no information
                continue
            for mask in list_images(folder):
                if mask.name not in expected[folder.name]:
                    raise DataError(f"mask {mask} matches no image in {test_dir / folder.name}")
    return finish_split(
        cat_dir.name,
        train,
        test,
        root=cat_dir,
        mask_threshold=mask_threshold,
        train_src=str(train_dir),
        test_src=str(test_dir),
        notes=notes,
    )
