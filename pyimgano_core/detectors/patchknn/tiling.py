"""Tiling for high-resolution parts: a fixed grid of overlapping tiles, one memory bank or one per tile.

``tiling: {tile: 448, overlap: 0.25}`` cuts each image, at native resolution (or rescaled by
``scale``), into ``tile`` x ``tile`` tiles; each tile is one model input, so small defects keep
their native pixels instead of being squashed to 224 px. Per axis the tiles are evenly spaced,
the first at 0 and the last ending at the border, with as few tiles as give at least ``overlap``
(a share of ``tile``) between neighbours: every pixel is covered, whatever the image size.

Memory (``bank``): ``shared`` puts every tile's patches into one bank (any tile position can
match any other; images may differ in size); ``per_tile`` keeps one bank per tile position (the
"tile ensemble" of anomalib issue #1727: tile (i, j) of a test image only meets tiles (i, j) of
the training images, so every image must give the same tile grid). Training features go through
the detector's feature store either way (bounded memory).

Maps: each tile's patch grid is upsampled bilinearly to the tile, the tiles are stitched with
overlap averaging (sum / count per pixel), and only then blurred (sigma in tile pixels = model-
input pixels), so tile seams are not blurred twice. The image score is the detector's
``aggregation`` (max, mean, top-k mean) over the stitched map before the blur, the analogue of
the untiled max over patch scores. The engine resizes a map at ``scale != 1`` back to the image.

Every patch-kNN detector takes ``tiling`` (a :class:`~.params.PatchKNNParams` field). This
module only plans, cuts and stitches; the detector embeds the tiles and scores their patches with
its own features, distances and patch scorer (:meth:`~.detector.PatchKNNDetector`).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError, DataError
from ...features.loading import Batch
from ..base import MAX_SIDE
from ...data.io import image_size, read_image

MIN_TILE = 16


class Tiling(BaseModel):
    """The ``detector.params.tiling`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    tile: int = Field(448, ge=MIN_TILE, le=MAX_SIDE, description="tile side in pixels of the (scaled) image = model input")
    overlap: float = Field(0.25, ge=0, lt=1, description="least overlap of neighbouring tiles, as a share of tile")
    scale: float = Field(1.0, gt=0, le=8, description="image rescale factor before tiling (1 = native resolution)")
    bank: Literal["shared", "per_tile"] = Field(
        "shared", description="shared: one memory bank for all tiles; per_tile: one bank per tile position (same grid for every image)")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of evenly spaced tiles covering ``[0, length)`` with at least ``overlap`` between neighbours."""
    if tile > length:
        raise ValueError(f"tile {tile} is longer than {length}")
    stride = max(1, tile - int(math.ceil(tile * overlap)))  # the largest step that keeps the overlap
    n = 1 + int(math.ceil((length - tile) / stride))
    if n == 1:
        return [0]
    # evenly spaced, first at 0, last at length - tile; the actual step is <= stride
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image: its original and scaled sizes, and the tile origins per axis."""

    orig_hw: tuple[int, int]
    hw: tuple[int, int]  # after scaling: the stitched map's size
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    tile: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of each tile in the scaled image, row-major: tile position k = i * nx + j."""
        return [(y, x) for y in self.ys for x in self.xs]

    def coverage(self) -> np.ndarray:
        """How many tiles cover each pixel of the scaled image (int32 [h, w])."""
        count = np.zeros(self.hw, np.int32)
        for y, x in self.origins:
            count[y : y + self.tile, x : x + self.tile] += 1
        return count


def scaled_hw(orig_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, int(round(orig_hw[0] * scale))), max(1, int(round(orig_hw[1] * scale)))


def plan_grid(orig_hw: tuple[int, int], tiling: Tiling, name: str = "") -> TileGrid:
    """The tile grid of an image of size ``orig_hw``; a tile larger than the (scaled) image is a ConfigError."""
    h, w = scaled_hw(orig_hw, tiling.scale)
    if tiling.tile > min(h, w):
        at = f" ({w}x{h} at tiling.scale={tiling.scale:g})" if tiling.scale != 1 else ""
        raise ConfigError(f"detector.params.tiling.tile={tiling.tile} is larger than image {name}{' ' if name else ''}"
                          f"({orig_hw[1]}x{orig_hw[0]} px{at}); use a smaller tile or a larger tiling.scale")
    return TileGrid(tuple(orig_hw), (h, w), tuple(tile_starts(h, tiling.tile, tiling.overlap)),
                    tuple(tile_starts(w, tiling.tile, tiling.overlap)), tiling.tile)


def cut_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The tiles of an HxWx3 uint8 image, [n_tiles, tile, tile, 3], row-major."""
    if image.shape[:2] != grid.hw:
        shrink = grid.hw[0] * grid.hw[1] < image.shape[0] * image.shape[1]
        image = cv2.resize(image, grid.hw[::-1], interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    t = grid.tile
    return np.stack([image[y : y + t, x : x + t] for y, x in grid.origins])


@dataclass
class TileBatch(Batch):
    """A batch of tiles (possibly of several images): which image and tile position each one is."""

    owner: np.ndarray | None = None  # int [B]: index of the image in the input sequence
    pos: np.ndarray | None = None  # int [B]: tile position k in its image's grid
    grids: dict | None = None  # {owner: TileGrid} of the images whose first tile is in this batch


def _read(item) -> np.ndarray:
    image = read_image(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be HxWx3 uint8 arrays or paths, got {image.dtype} {image.shape}")
    return image


def _name(images: Sequence, i: int) -> str:
    item = images[i] if isinstance(images, (list, tuple)) else None  # a lazy sequence (rotations) would decode again
    return str(item) if isinstance(item, (str, os.PathLike)) else f"#{i}"


def iter_tile_batches(images: Sequence, tiling: Tiling, batch_size: int, grid_shape: tuple[int, int] | None = None,
                      errors: dict | None = None, workers: int = 4) -> Iterator[TileBatch]:
    """Yield batches of ``batch_size`` tiles in input order, decoding images on threads two ahead.

    An image that cannot be tiled (smaller than a tile; with ``grid_shape``, the per_tile bank's
    tile grid, another grid) fails alone: its reason goes into ``errors`` (index -> message) and
    it gives no tiles, or, with ``errors`` None, it raises a :class:`DataError`.
    """
    pending: list[tuple[np.ndarray, int, int, tuple[int, int]]] = []  # (tile, owner, pos, owner's hw)
    grids: dict[int, TileGrid] = {}  # planned, not yet sent with a batch

    def flush(n: int) -> TileBatch:
        nonlocal pending
        take, pending = pending[:n], pending[n:]
        owner = np.array([o for _, o, _, _ in take], np.int64)
        first = {o: grids.pop(o) for o in dict.fromkeys(owner.tolist()) if o in grids}
        pixels = torch.from_numpy(np.stack([t for t, _, _, _ in take])).permute(0, 3, 1, 2).float().div_(255.0)
        return TileBatch(pixels, np.zeros((len(take), 4)), np.array([hw for *_, hw in take], np.int64), owner,
                         np.array([k for _, _, k, _ in take], np.int64), first)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_read, im) for im in images[:2]]
        for i in range(len(images)):
            image = futures[i].result()
            futures[i] = None
            if i + 2 < len(images):
                futures.append(pool.submit(_read, images[i + 2]))
            try:
                grid = plan_grid(image.shape[:2], tiling, _name(images, i))
                if grid_shape is not None and grid.shape != tuple(grid_shape):
                    raise DataError(f"image {_name(images, i)} gives a {grid.shape[0]}x{grid.shape[1]} tile grid but the "
                                    f"per_tile memory banks are {grid_shape[0]}x{grid_shape[1]}; tiling.bank: per_tile "
                                    "needs images of one size (or use tiling.bank: shared)")
            except (ConfigError, DataError) as exc:  # at predict time: this image fails, not the whole run
                if errors is None:
                    raise DataError(str(exc)) from None
                errors[i] = str(exc)
                continue
            grids[i] = grid
            pending.extend((t, i, k, image.shape[:2]) for k, t in enumerate(cut_tiles(image, grid)))
            while len(pending) >= batch_size:
                yield flush(batch_size)
        if pending:
            yield flush(len(pending))


# ---------------------------------------------------------------------------- fit / predict
def check_training_sizes(images: Sequence, tiling: Tiling) -> list[TileGrid]:
    """Tile grids of the training images from their headers (before any long work).

    Raises ConfigError for a tile larger than an image; for ``bank: per_tile``, a DataError
    when the images do not all give the same tile grid.
    """
    grids = []
    for i, item in enumerate(images):
        hw = image_size(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item).shape[:2]
        grids.append(plan_grid(tuple(int(v) for v in hw), tiling, _name(images, i)))
    if tiling.bank == "per_tile":
        shapes = sorted({g.shape for g in grids})
        if len(shapes) > 1:
            raise DataError(f"tiling.bank: per_tile needs one tile grid for every training image, got grids "
                            f"{', '.join(f'{a}x{b}' for a, b in shapes)} (images of several sizes); use tiling.bank: shared")
    return grids


class Stitcher:
    """Overlap-averaged map of one image: per-pixel sum and count of its tiles' upsampled grids."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        self.sum = np.zeros(grid.hw, np.float32)
        self.count = np.zeros(grid.hw, np.float32)
        self.done = 0

    def add(self, pos: int, patch_grid: np.ndarray) -> None:
        t = self.grid.tile
        y, x = self.grid.origins[pos]
        # bilinear with half-pixel centres, as the untiled maps (patchknn.upsample before its blur)
        self.sum[y : y + t, x : x + t] += cv2.resize(patch_grid.astype(np.float32), (t, t), interpolation=cv2.INTER_LINEAR)
        self.count[y : y + t, x : x + t] += 1
        self.done += 1

    @property
    def complete(self) -> bool:
        return self.done == len(self.grid.origins)

    def result(self) -> np.ndarray:
        return self.sum / self.count  # every pixel has count >= 1 (tile_starts covers the image)


def describe(tiling: Tiling) -> dict:
    """The tiling rule, for the report's protocol."""
    return {"rule": "tiles", **tiling.model_dump(mode="json"),
            "grid": "per axis: fewest evenly spaced tiles with at least the overlap, first at 0, last at the border",
            "stitching": "bilinear tile maps averaged where tiles overlap, then the Gaussian blur on the stitched map",
            "image_score": "aggregation over the stitched map before the blur (blurred_max: after it)",
            "map_resolution": "the image rescaled by tiling.scale (resized back to the image by the engine)"}

