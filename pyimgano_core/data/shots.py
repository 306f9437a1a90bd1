"""Few-shot protocol: fit on ``k`` training images chosen with the experiment seed."""
from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import ConfigError
from .types import Sample

ShotsProtocol = Literal["reference", "random"]


def select_shots(train: list[Sample], k: int | None, seed: int, protocol: ShotsProtocol = "reference") -> list[Sample]:
    """``k`` training samples (all of them when ``k`` is None), chosen by ``protocol``.

    ``reference`` is AnomalyDINO's (``run_anomaly_detection`` in dammsi/AnomalyDINO's
    ``src/detection.py``): the training images sorted by name, then the slice
    ``[seed*k : (seed+1)*k]``, so seeds 0, 1, 2 use disjoint images. ``random`` draws ``k``
    images with ``np.random.default_rng(seed)``; the draw depends only on ``(seed, len(train))``.
    Either way the chosen samples keep their sorted order.
    """
    if k is None:
        return list(train)
    if protocol == "reference":
        # Sorted by path: within one training folder (MVTec's train/good) that is the reference's
        # sorted(os.listdir(...)). The reference runs on with fewer images when the slice runs out;
        # here that is an error, so a run never silently fits on fewer shots than it reports.
        ordered = sorted(train, key=lambda s: str(s.path))
        pick = ordered[seed * k : (seed + 1) * k]
        if seed < 0 or len(pick) < k:
            raise ConfigError(f"dataset.shots={k} with shots_protocol=reference and seed={seed} needs images "
                              f"{seed * k}..{(seed + 1) * k - 1} of the sorted training set, which has {len(train)}")
        return pick
    if protocol != "random":
        raise ValueError(f"shots_protocol must be reference or random; got {protocol!r}")
    if k > len(train):
        raise ConfigError(f"dataset.shots={k} but only {len(train)} training images are available")
    pick = np.sort(np.random.default_rng(seed).choice(len(train), size=k, replace=False))
    return [train[i] for i in pick]


def describe_shots(k: int | None, seed: int, protocol: ShotsProtocol) -> str | None:
    """One line for the report's protocol section (None for full-shot runs)."""
    if k is None:
        return None
    if protocol == "reference":
        return f"{k}-shot, reference protocol: sorted training images [{seed * k}:{(seed + 1) * k}] (seed {seed})"
    return f"{k}-shot, random protocol: {k} training images drawn with seed {seed}"
