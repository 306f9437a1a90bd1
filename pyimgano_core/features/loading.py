"""Streaming image batches in model geometry, decoded on a thread pool."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .geometry import Geometry
from ..data.io import read_image


@dataclass
class Batch:
    pixels: torch.Tensor  # float [B, 3, h, w] in [0, 1], RGB
    boxes: np.ndarray  # float [B, 4] (y0, x0, y1, x1) in original pixels
    orig_hw: np.ndarray  # int [B, 2]


def _prepare(item, geometry: Geometry) -> tuple[np.ndarray, tuple, tuple[int, int]]:
    image = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be HxWx3 uint8 arrays or paths, got {image.dtype} {image.shape}")
    hw = image.shape[:2]
    return geometry.apply(image), geometry.box(hw), hw


def iter_batches(images: Sequence, geometry: Geometry, batch_size: int, workers: int = 4) -> Iterator[Batch]:
    """Yield batches in input order; consecutive images of equal model-input size share a batch.

    Decoding runs ``workers`` images ahead on threads (OpenCV and PIL release the GIL), so
    the network never waits for PNG decoding. Memory holds at most ~2 batches of inputs.
    A single image is prepared inline: there is nothing to overlap it with (an inspection
    server's one-frame ``predict``), and the thread hand-off would only add latency.
    """
    if len(images) == 1:
        yield _collate([_prepare(images[0], geometry)])
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_prepare, im, geometry) for im in images[: 2 * batch_size]]
        nxt = len(futures)
        pending: list = []
        for i in range(len(images)):
            item = futures[i].result()
            futures[i] = None  # free the decoded image once consumed
            if nxt < len(images):
                futures.append(pool.submit(_prepare, images[nxt], geometry))
                nxt += 1
            if pending and item[0].shape != pending[0][0].shape:
                yield _collate(pending)
                pending = []
            pending.append(item)
            if len(pending) == batch_size:
                yield _collate(pending)
                pending = []
        if pending:
            yield _collate(pending)


def _collate(items) -> Batch:
    arr = np.stack([it[0] for it in items])  # (B, h, w, 3) uint8
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    return Batch(pixels, np.array([it[1] for it in items], dtype=np.float64), np.array([it[2] for it in items], dtype=np.int64))
