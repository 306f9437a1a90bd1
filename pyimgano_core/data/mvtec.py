"""MVTec AD layout: ``<category>/{train/good, test/<defect>, ground_truth/<defect>}``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import DatasetBase, abs_path, load_tree, resolve_categories
from .types import Split


class MVTecConfig(DatasetBase):
    """``dataset: {type: mvtec_ad, root, category}``.

    Attributes
    ----------
    root : Path
        Folder holding the category folders (relative to the working directory).
    category : str or list of str
        One category, several, or ``"all"`` (every sub-folder with ``train/`` and
        ``test/``).
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects (MVTec masks are 0/255).
    """

    type: Literal["mvtec_ad"] = "mvtec_ad"
    root: Path
    category: str | list[str] = "all"
    mask_threshold: int = Field(127, ge=0, le=254)


def is_tree_category(folder: Path) -> bool:
    """A ``train/`` + ``test/`` category folder (MVTec AD, BTAD, preprocessed VisA)."""
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def load_mvtec(cfg: MVTecConfig) -> list[Split]:
    """Load every requested MVTec AD category (no contamination applied).

    Masks are ``ground_truth/<defect>/<stem>_mask.png``.
    """
    root = abs_path(cfg.root)
    names = resolve_categories(root, cfg.category, is_tree_category, "mvtec_ad")
    return [
        load_tree(
            root / name,
            cfg,
            kind="mvtec_ad",
            normal="good",
            mask_names=lambda stem: [f"{stem}_mask.png"],
            mask_threshold=cfg.mask_threshold,
        )
        for name in names
    ]
