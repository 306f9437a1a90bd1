"""Contaminated-training protocol of SoftPatch (Jiang et al., NeurIPS 2022).

``int(ratio * n_train)`` anomalous test images, drawn with a seeded generator, are
moved into the training set (or copied, with ``overlap=True``: the "overlap"
setting of the paper, where the contaminating images stay in the test set too).
Works on any layout because it only sees a :class:`Split`.
"""

from __future__ import annotations


import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .types import Split, rel_path


class Contamination(BaseModel):
    """``dataset.contamination``: share of anomalous images mixed into training.

    Attributes
    ----------
    ratio : float
        Number of contaminating images as a fraction of the clean training set
        size (SoftPatch's "noise ratio"); 0.1 adds 10 images to 100 normal ones.
    seed : int
        Seed of the draw; the same seed picks the same files on every machine.
    overlap : bool
        Keep the moved images in the test set as well (paper's overlap setting).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ratio: float = Field(ge=0)
    seed: int = 0
    overlap: bool = False


def apply_contamination(split: Split, cfg: Contamination | None) -> Split:
    """Move (or copy) anomalous test samples into ``split.train``, in place.

    Parameters
    ----------
    split : Split
        A loaded split; ``split.notes["root"]`` (when present) is the folder the
        recorded paths are made relative to.
    cfg : Contamination or None
        ``None`` leaves the split untouched.

    Returns
    -------
    Split
        The same object, with ``notes["contamination"]`` recording ratio, seed,
        overlap and the moved files (relative posix paths, sorted).

    Raises
    ------
    ConfigError
        When the ratio asks for more anomalous images than the test set holds.
    """
    if cfg is None:
        return split
    anomalous = sorted((s for s in split.test if s.label == 1), key=lambda s: str(s.path))
    n_move = int(cfg.ratio * len(split.train))
    if n_move > len(anomalous):
        raise ConfigError(
            f"dataset.contamination.ratio={cfg.ratio} needs {n_move} defective images "
            f"but category {split.name} has only {len(anomalous)}"
        )
    # Draw from the path-sorted list so the choice depends only on seed and files.
    rng = np.random.default_rng(cfg.seed)
    picked = sorted(int(i) for i in rng.choice(len(anomalous), size=n_move, replace=False))
    moved = [anomalous[i] for i in picked]
    moved_paths = {s.path for s in moved}
    split.train = sorted(split.train + moved, key=lambda s: str(s.path))
    if not cfg.overlap:
        split.test = [s for s in split.test if s.path not in moved_paths]
    root = split.notes.get("root")
    split.notes["contamination"] = {
        "ratio": cfg.ratio,
        "seed": cfg.seed,
        "overlap": cfg.overlap,
        "moved": [rel_path(s.path, root) for s in moved],
    }
    return split
