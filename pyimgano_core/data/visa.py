"""VisA: the official release (split by ``split_csv/1cls.csv``) and the common
preprocessed MVTec-like conversion (``<cat>/{train,test}/{good,bad}``).

VisA masks mark defects with any non-zero value (label indices, not 0/255),
hence the default ``mask_threshold: 0``. Every anomaly gets ``defect_type="bad"``:
the release has one anomaly class per category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import DataError
from .base import DatasetBase, abs_path, finish_split, list_images, load_tree, resolve_categories
from .manifest import read_table, samples_from_rows
from .mvtec import is_tree_category
from .types import Split

CSV_COLUMNS = ("object", "split", "label", "image", "mask")


class VisAConfig(DatasetBase):
    """``dataset: {type: visa, root, category}``.

    Attributes
    ----------
    root : Path
        The VisA root (holding the category folders and, for the official
        layout, ``split_csv/``).
    category : str or list of str
        One category, several, or ``"all"``.
    layout : {"auto", "official", "preprocessed"}
        ``auto`` decides per category: ``Data/`` means official, ``train/`` +
        ``test/`` means preprocessed.
    split_csv : Path or None
        Official layout only: the split file (default ``<root>/split_csv/1cls.csv``;
        a given path is relative to the working directory). Its image and mask
        paths are relative to ``root``.
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects.
    """

    type: Literal["visa"] = "visa"
    root: Path
    category: str | list[str] = "all"
    layout: Literal["auto", "official", "preprocessed"] = "auto"
    split_csv: Path | None = None
    mask_threshold: int = Field(0, ge=0, le=254)


def _layout_of(cat_dir: Path, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if (cat_dir / "Data").is_dir():
        return "official"
    if is_tree_category(cat_dir):
        return "preprocessed"
    raise DataError(
        f"visa category folder {cat_dir} has neither Data/ (official layout) "
        "nor train/ and test/ (preprocessed layout)"
    )


def _load_official(cat_dir: Path, cfg: VisAConfig, csv_path: Path, rows) -> Split:
    name = cat_dir.name
    mine = [(n, r) for n, r in rows if r.get("object") == name]
    if not mine:
        raise DataError(f"visa split file {csv_path} has no rows for object '{name}'")
    train, test, warnings = samples_from_rows(
        mine, src=csv_path, base=cat_dir.parent, cfg=cfg, anomaly_type="bad", what="visa split file"
    )
    # Masks are checked against the image folder, not the CSV: a custom split
    # may leave images out, but a mask without any image is a broken release.
    images_dir, masks_dir = (
        cat_dir / "Data" / "Images" / "Anomaly",
        cat_dir / "Data" / "Masks" / "Anomaly",
    )
    if masks_dir.is_dir():
        stems = {p.stem for p in list_images(images_dir)} if images_dir.is_dir() else set()
        for mask in list_images(masks_dir):
            if mask.stem not in stems:
                raise DataError(f"mask {mask} matches no image in {images_dir}")
    return finish_split(
        name,
        train,
        test,
        root=cat_dir,
        mask_threshold=cfg.mask_threshold,
        train_src=f"{csv_path} (object {name}, split train)",
        test_src=f"{csv_path} (object {name}, split test)",
        notes={"layout": "official", "warnings": warnings},
    )


def load_visa(cfg: VisAConfig) -> list[Split]:
    """Load every requested VisA category (no contamination applied)."""
    root = abs_path(cfg.root)

    def is_category(folder: Path) -> bool:
        official = (folder / "Data").is_dir()
        pre = is_tree_category(folder)
        return {"auto": official or pre, "official": official, "preprocessed": pre}[cfg.layout]

    names = resolve_categories(root, cfg.category, is_category, "visa")
    splits, rows, csv_path = [], None, None
    for name in names:
        cat_dir = root / name
        if _layout_of(cat_dir, cfg.layout) == "preprocessed":
            splits.append(
                load_tree(
                    cat_dir,
                    cfg,
                    kind="visa",
                    normal="good",
                    mask_names=lambda stem: [f"{stem}.png"],
                    mask_threshold=cfg.mask_threshold,
                    notes={"layout": "preprocessed"},
                )
            )
            continue
        if rows is None:  # read the split file once for all categories
            csv_path = abs_path(cfg.split_csv) if cfg.split_csv else root / "split_csv" / "1cls.csv"
            if not csv_path.is_file():
                raise DataError(
                    f"visa split file {csv_path} does not exist (official layout of {cat_dir})"
                )
            rows = read_table(
                csv_path, CSV_COLUMNS, ("object", "split", "label", "image"), "visa split file"
            )
        splits.append(_load_official(cat_dir, cfg, csv_path, rows))
    return splits
