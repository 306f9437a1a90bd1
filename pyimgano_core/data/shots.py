"""Few-shot protocol: fit on ``k`` training images drawn with the experiment seed."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .types import Sample


def select_shots(train: list[Sample], k: int | None, seed: int) -> list[Sample]:
    """A seeded random choice of ``k`` training samples (all of them when ``k`` is None).

    The draw depends only on ``(seed, len(train))``, so seeds 0, 1, 2 give the usual
    few-shot repetitions; the chosen samples keep their sorted order.
    """
    if k is None:
        return list(train)
    if k > len(train):
        raise ConfigError(f"dataset.shots={k} but only {len(train)} training images are available")
    pick = np.sort(np.random.default_rng(seed).choice(len(train), size=k, replace=False))
    return [train[i] for i in pick]
