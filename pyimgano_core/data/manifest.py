"""Custom data, way 1: a manifest (CSV or JSONL) listing image, split, label, mask, defect type."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import DataError
from .base import DatasetBase, abs_path, finish_split
from .types import GOOD, Sample, Split

LABELS = {
    "0": 0, "normal": 0, "good": 0, "ok": 0,
    "1": 1, "anomaly": 1, "bad": 1, "ng": 1,
}  # fmt: skip
MANIFEST_COLUMNS = ("image", "split", "label", "mask", "defect_type")


# ------------------------------------------------------------------ manifest


class ManifestConfig(DatasetBase):
    """``dataset: {type: manifest, path}``: one row per image.

    Attributes
    ----------
    path : Path
        ``.csv`` (header ``image,split,label[,mask][,defect_type]``) or ``.jsonl``
        (one object per line with the same keys). Relative image/mask paths are
        relative to the manifest's folder.
    category : str or None
        Split name; default: the manifest's file stem.
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects.
    allow_outside_root : bool
        Paths in the manifest must stay inside its folder (no ``../`` escapes, no absolute
        paths elsewhere), so a manifest from someone else cannot make us read arbitrary
        files; ``true`` lifts that. Symlinks inside the folder are followed as usual.
    """

    type: Literal["manifest"] = "manifest"
    path: Path
    category: str | None = None
    mask_threshold: int = Field(127, ge=0, le=254)
    allow_outside_root: bool = Field(False, description="allow image/mask paths outside the manifest's folder")


def read_table(
    path: Path, allowed: tuple[str, ...], required: tuple[str, ...], what: str = "manifest"
) -> list[tuple[int, dict]]:
    """Rows of a CSV or JSONL file as ``(line number, {column: str})``.

    Unknown columns are an error: a misspelt ``mask`` column would otherwise
    silently drop every mask.
    """
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    try:
        if suffix == ".csv":
            # utf-8-sig: spreadsheets often prepend a byte-order mark.
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in reader.fieldnames or []]
                _check_columns(what, path, columns, allowed, required)
                for raw in reader:
                    if None in raw:
                        raise DataError(
                            f"{what} {path} line {reader.line_num}: more values than columns"
                        )
                    rows.append(
                        (reader.line_num, {k.strip(): (v or "").strip() for k, v in raw.items()})
                    )
        elif suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8-sig") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(
                            f"{what} {path} line {n}: invalid JSON ({exc.msg})"
                        ) from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{what} {path} line {n}: expected a JSON object")
                    _check_columns(what, path, list(obj), allowed, required, n)
                    rows.append(
                        (n, {k: "" if v is None else str(v).strip() for k, v in obj.items()})
                    )
        else:
            raise DataError(f"{what} {path}: unknown format {suffix!r} (expected .csv or .jsonl)")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    return rows


def _check_columns(what, path, columns, allowed, required, line=None) -> None:
    where = f"{what} {path}" + (f" line {line}" if line else "")
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise DataError(f"{where}: unknown column {unknown[0]!r} (allowed: {', '.join(allowed)})")
    absent = [c for c in required if c not in columns]
    if absent:
        raise DataError(f"{where}: missing column {absent[0]!r} (required: {', '.join(required)})")


def samples_from_rows(
    rows: list[tuple[int, dict]],
    *,
    src: Path,
    base: Path,
    cfg: DatasetBase,
    anomaly_type: str,
    what: str = "manifest",
    confine: bool = True,
) -> tuple[list[Sample], list[Sample], list[str]]:
    """Turn manifest-style rows into train and test samples.

    Parameters
    ----------
    rows : list of (int, dict)
        Line number and ``image, split, label[, mask][, defect_type]`` strings.
    src : Path
        The file the rows came from (named in every error).
    base : Path
        Folder that relative paths are relative to.
    cfg : DatasetBase
        For the ``missing_mask`` policy.
    anomaly_type : str
        ``defect_type`` of anomalous rows that give none.
    what : str
        What the file is called in error messages.

    Returns
    -------
    train, test : list of Sample
    warnings : list of str
    """
    train: list[Sample] = []
    test: list[Sample] = []
    seen: dict[Path, int] = {}
    root = os.path.normpath(abs_path(base))

    def inside(kind: str, value: str, where: str) -> Path:
        path = abs_path(value, base)
        if confine and os.path.commonpath([root, os.path.normpath(path)]) != root:
            raise DataError(f"{where}: {kind} path {value!r} is outside the {what}'s folder {root}; "
                            "set dataset.allow_outside_root: true to allow it")
        return path

    for n, row in rows:
        where = f"{what} {src} line {n}"
        if not row.get("image"):
            raise DataError(f"{where}: empty image path")
        img = inside("image", row["image"], where)
        if img in seen:
            raise DataError(f"{what} {src} lines {seen[img]} and {n} both list image {img}")
        seen[img] = n
        if not img.is_file():
            raise DataError(f"{where}: image {img} does not exist")
        split = row.get("split", "").lower()
        if split not in ("train", "test"):
            raise DataError(f"{where}: split {row.get('split')!r} is not 'train' or 'test'")
        label = LABELS.get(row.get("label", "").lower())
        if label is None:
            raise DataError(
                f"{where}: label {row.get('label')!r} is not one of {', '.join(LABELS)}"
            )
        defect = row.get("defect_type") or ""
        mask = None
        if label == 0:
            if defect and defect.lower() not in ("good", "normal", "ok"):
                raise DataError(f"{where}: normal image has defect_type {defect!r}")
            defect = GOOD  # a normal image's mask is all background: any listed mask is unused
        else:
            defect = defect or anomaly_type
            if defect == GOOD:
                raise DataError(f"{where}: defective image has defect_type 'good'")
            if row.get("mask"):
                mask = inside("mask", row["mask"], where)
                if not mask.is_file():
                    raise DataError(f"{where}: mask {mask} does not exist")
            elif split == "test" and cfg.missing_mask == "error":
                raise DataError(
                    f"{where}: defective image {img} has no mask; "
                    "set dataset.missing_mask: exclude to keep it without pixel ground truth"
                )
        (train if split == "train" else test).append(Sample(img, label, defect, mask))
    warnings = []
    n_bad_train = sum(s.label for s in train)
    if n_bad_train:
        warnings.append(
            f"{n_bad_train} defective image(s) listed for training: training set is contaminated"
        )
    return train, test, warnings


def load_manifest(cfg: ManifestConfig) -> list[Split]:
    """Load the single split a manifest describes."""
    path = abs_path(cfg.path)
    rows = read_table(path, MANIFEST_COLUMNS, ("image", "split", "label"))
    train, test, warnings = samples_from_rows(
        rows, src=path, base=path.parent, cfg=cfg, anomaly_type="defect", confine=not cfg.allow_outside_root
    )
    where = f"manifest {path}"
    return [
        finish_split(
            cfg.category or path.stem,
            train,
            test,
            root=path.parent,
            mask_threshold=cfg.mask_threshold,
            train_src=where,
            test_src=where,
            notes={"warnings": warnings},
        )
    ]
