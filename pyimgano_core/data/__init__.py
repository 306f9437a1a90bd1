"""Datasets: configs for every supported layout, loading into splits, summaries.

>>> cfg = parse_dataset_config({"type": "mvtec_ad", "root": "data/mvtec", "category": "bottle"})
>>> [split] = load_splits(cfg)          # doctest: +SKIP
>>> describe(split)["test"]["by_defect"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from ..errors import DataError
from .base import rel_path
from .btad import BTADConfig, load_btad
from .contamination import Contamination, apply_contamination
from .folder import FolderConfig, MaskSpec, load_folder
from .manifest import ManifestConfig, load_manifest
from .io import image_size, read_image, read_mask
from .mvtec import MVTecConfig, load_mvtec
from .types import GOOD, Sample, Split
from .visa import VisAConfig, load_visa

DatasetConfig = Annotated[
    MVTecConfig | VisAConfig | BTADConfig | ManifestConfig | FolderConfig,
    Field(discriminator="type"),
]

_LOADERS = {
    "mvtec_ad": load_mvtec,
    "visa": load_visa,
    "btad": load_btad,
    "manifest": load_manifest,
    "folder": load_folder,
}
_ADAPTER: TypeAdapter = TypeAdapter(DatasetConfig)


def parse_dataset_config(data: Any) -> DatasetConfig:
    """Validate a ``dataset:`` mapping (e.g. from YAML) into its config model.

    Raises
    ------
    pydantic.ValidationError
        Unknown ``type``, unknown field, or a bad value (with the field path).
    """
    return _ADAPTER.validate_python(data)


def load_splits(cfg: DatasetConfig | dict) -> list[Split]:
    """Load, validate and (optionally) contaminate every category of a dataset.

    Parameters
    ----------
    cfg : DatasetConfig or dict
        A dataset config model, or a mapping validated with
        :func:`parse_dataset_config`.

    Returns
    -------
    list of Split
        One split per category, sorted by name; samples sorted by path.

    Raises
    ------
    DataError
        Missing folders or files, masks without images or of the wrong size,
        duplicate stems, empty splits, defective images without masks (unless
        ``missing_mask: exclude``).
    ConfigError
        A contamination ratio that needs more defective images than exist.
    """
    if isinstance(cfg, dict):
        cfg = parse_dataset_config(cfg)
    splits = sorted(_LOADERS[cfg.type](cfg), key=lambda s: s.name)
    return [apply_contamination(s, cfg.contamination) for s in splits]


def _counts(samples: list[Sample]) -> dict:
    by_defect = Counter(s.defect_type for s in samples)
    return {
        "total": len(samples),
        "normal": sum(1 for s in samples if s.label == 0),
        "anomalous": sum(1 for s in samples if s.label == 1),
        # "good" first, then defect types alphabetically: reads like a table.
        "by_defect": {k: by_defect[k] for k in sorted(by_defect, key=lambda k: (k != GOOD, k))},
    }


def describe(split: Split) -> dict:
    """Summarise a split for ``pyimgano data CONFIG`` (JSON-able).

    Image sizes come from file headers (no decoding); an unreadable header is
    listed under ``problems`` rather than raised, so the summary always completes.

    Returns
    -------
    dict
        ``name``, ``root``, ``mask_threshold``, ``train`` / ``test`` counts
        (``total``, ``normal``, ``anomalous``, ``by_defect``), ``image_size``
        (``height`` and ``width`` as ``[min, max]``, ``distinct`` sizes; ``None``
        when no header was readable), ``masks`` (``found``, ``missing``,
        ``empty`` among defective test images), ``contamination`` (or ``None``)
        and ``problems`` (the split's warnings plus unreadable headers).
    """
    problems = list(split.notes.get("warnings", []))
    sizes = set()
    seen = set()
    for s in split.train + split.test:
        if s.path in seen:  # overlap contamination lists a file twice
            continue
        seen.add(s.path)
        try:
            sizes.add(image_size(s.path))
        except DataError as exc:
            problems.append(str(exc))
    size_info = None
    if sizes:
        hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
        size_info = {
            "height": [min(hs), max(hs)],
            "width": [min(ws), max(ws)],
            "distinct": len(sizes),
        }
    anomalous = [s for s in split.test if s.label == 1]
    # Contamination may have moved some empty-mask images out of the test set.
    in_test = {rel_path(s.path, split.notes.get("root")) for s in anomalous}
    empty = [p for p in split.notes.get("empty_masks", []) if p in in_test]
    return {
        "name": split.name,
        "root": split.notes.get("root"),
        "mask_threshold": split.mask_threshold,
        "train": _counts(split.train),
        "test": _counts(split.test),
        "image_size": size_info,
        "masks": {
            "found": sum(1 for s in anomalous if s.mask_path is not None),
            "missing": sum(1 for s in anomalous if s.mask_path is None),
            "empty": len(empty),
        },
        "contamination": split.notes.get("contamination"),
        "problems": problems,
    }


__all__ = [
    "BTADConfig",
    "Contamination",
    "DatasetConfig",
    "FolderConfig",
    "ManifestConfig",
    "MaskSpec",
    "MVTecConfig",
    "Sample",
    "Split",
    "VisAConfig",
    "apply_contamination",
    "describe",
    "image_size",
    "load_splits",
    "parse_dataset_config",
    "read_image",
    "read_mask",
]
