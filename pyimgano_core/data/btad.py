"""BTAD layout: ``<01|02|03>/{train/ok, test/ok, test/ko, ground_truth/ko}``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .base import DatasetBase, abs_path, load_tree, resolve_categories
from .mvtec import is_tree_category
from .types import Split


class BTADConfig(DatasetBase):
    """``dataset: {type: btad, root, category}``.

    Attributes
    ----------
    root : Path
        Folder holding ``01``, ``02``, ``03``.
    category : str or list of str
        ``"01"``, ``"02"``, ``"03"``, a list, or ``"all"``. YAML reads ``01`` as the
        integer 1, so integers are accepted and zero-padded.
    mask_threshold : int
        Mask pixels ``> mask_threshold`` are defects.
    """

    type: Literal["btad"] = "btad"
    root: Path
    category: str | list[str] = "all"
    mask_threshold: int = Field(127, ge=0, le=254)

    @field_validator("category", mode="before")
    @classmethod
    def _pad_ints(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:02d}"
        if isinstance(v, list):
            return [f"{x:02d}" if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


def load_btad(cfg: BTADConfig) -> list[Split]:
    """Load every requested BTAD product; masks are ``ground_truth/ko/<stem>.png`` or ``.bmp``."""
    root = abs_path(cfg.root)
    names = resolve_categories(root, cfg.category, is_tree_category, "btad")
    return [
        load_tree(
            root / name,
            cfg,
            kind="btad",
            normal="ok",
            mask_names=lambda stem: [f"{stem}.png", f"{stem}.bmp"],
            mask_threshold=cfg.mask_threshold,
        )
        for name in names
    ]
