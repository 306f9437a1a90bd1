"""Tiny synthetic datasets in every supported layout, for fast tests.

Normal images are a smooth periodic texture plus a little noise; defective images
carry one planted bright or dark blob whose exact footprint is the mask. Every
helper is deterministic under ``seed`` and writes a few dozen small files
(``make_mvtec_tree`` with its defaults takes a few milliseconds).

Kept stable on purpose: CLI end-to-end tests build on ``make_mvtec_tree``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

DEFAULT_DEFECTS = {"scratch": 3, "dent": 2}


def normal_image(rng: np.random.Generator, size: tuple[int, int], gray: bool = False) -> np.ndarray:
    """A smooth textured pattern (two crossed sinusoids) with small noise, uint8 RGB or gray."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 0.3)  # small: normal images must look alike
    base = 128 + 40 * np.sin(xx / 5.0 + phase) * np.cos(yy / 7.0 - phase)
    img = base + rng.normal(0, 3, size=(h, w))
    if gray:
        return np.clip(img, 0, 255).astype(np.uint8)
    tint = np.array([1.0, 0.9, 0.8], dtype=np.float32)
    return np.clip(img[:, :, None] * tint, 0, 255).astype(np.uint8)


def plant_blob(img: np.ndarray, rng: np.random.Generator, bright: bool) -> np.ndarray:
    """Paint a filled disk into ``img`` (in place); return its 0/255 uint8 mask."""
    h, w = img.shape[:2]
    r = max(2, min(h, w) // 8)
    cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (cx, cy), r, 255, thickness=-1)
    img[mask > 0] = 250 if bright else 5
    return mask


def write_image(path: Path, img: np.ndarray) -> Path:
    """Write an RGB (or gray) uint8 array; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = img[:, :, ::-1] if img.ndim == 3 else img  # OpenCV wants BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(data)):
        raise OSError(f"could not write {path}")
    return path


def _defective(rng, size, i, gray=False):
    img = normal_image(rng, size, gray)
    mask = plant_blob(img, rng, bright=i % 2 == 0)
    return img, mask


def make_mvtec_tree(
    root: str | Path,
    category: str = "widget",
    n_train: int = 8,
    n_test_good: int = 3,
    defects: Mapping[str, int] | None = None,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> Path:
    """Write ``root/<category>/{train/good, test/<defect>, ground_truth/<defect>}``.

    Parameters
    ----------
    root : path
        Dataset root (created if needed); use it as ``dataset.root``.
    category : str
        Category folder name.
    n_train, n_test_good : int
        Normal training / test images.
    defects : mapping of str to int, optional
        Defective test images per defect type; default ``{"scratch": 3, "dent": 2}``.
    size : (int, int)
        Image height and width.
    seed : int
        Seed of the textures and blob positions.

    Returns
    -------
    Path
        ``root`` (the folder holding the category).
    """
    root = Path(root)
    cat = root / category
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        write_image(cat / "train" / "good" / f"{i:03d}.png", normal_image(rng, size))
    for i in range(n_test_good):
        write_image(cat / "test" / "good" / f"{i:03d}.png", normal_image(rng, size))
    for defect, n in (DEFAULT_DEFECTS if defects is None else defects).items():
        for i in range(n):
            img, mask = _defective(rng, size, i)
            write_image(cat / "test" / defect / f"{i:03d}.png", img)
            write_image(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def make_visa_tree(
    root: str | Path,
    category: str = "candle",
    layout: str = "official",
    n_train: int = 6,
    n_test_good: int = 2,
    n_bad: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
    mask_value: int = 255,
) -> Path:
    """Write a VisA category in the ``official`` or ``preprocessed`` layout; return ``root``.

    Official: ``<cat>/Data/Images/{Normal,Anomaly}/*.JPG``, ``<cat>/Data/Masks/Anomaly/*.png``
    and rows appended to ``root/split_csv/1cls.csv`` (created with its header).
    Preprocessed: ``<cat>/{train/good, test/good, test/bad, ground_truth/bad/<stem>.png}``.
    ``mask_value`` is the defect value written in masks (VisA uses small label values).
    """
    root = Path(root)
    cat = root / category
    rng = np.random.default_rng(seed)
    normals = [normal_image(rng, size) for _ in range(n_train + n_test_good)]
    bads = [_defective(rng, size, i) for i in range(n_bad)]
    if layout == "preprocessed":
        for i, img in enumerate(normals):
            sub = "train" if i < n_train else "test"
            write_image(cat / sub / "good" / f"{i:03d}.JPG", img)
        for i, (img, mask) in enumerate(bads):
            write_image(cat / "test" / "bad" / f"{i:03d}.JPG", img)
            write_image(
                cat / "ground_truth" / "bad" / f"{i:03d}.png",
                (mask > 0).astype(np.uint8) * mask_value,
            )
        return root
    if layout != "official":
        raise ValueError(f"layout must be official or preprocessed, not {layout!r}")
    rows = []
    for i, img in enumerate(normals):
        rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
        write_image(root / rel, img)
        rows.append([category, "train" if i < n_train else "test", "normal", rel, ""])
    for i, (img, mask) in enumerate(bads):
        rel, mrel = (
            f"{category}/Data/Images/Anomaly/{i:03d}.JPG",
            f"{category}/Data/Masks/Anomaly/{i:03d}.png",
        )
        write_image(root / rel, img)
        write_image(root / mrel, (mask > 0).astype(np.uint8) * mask_value)
        rows.append([category, "test", "anomaly", rel, mrel])
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_btad_tree(
    root: str | Path,
    category: str = "01",
    n_train: int = 6,
    n_test_ok: int = 2,
    n_ko: int = 4,
    size: tuple[int, int] = (48, 48),
    seed: int = 0,
    image_ext: str = ".bmp",
    mask_ext: str = "mixed",
) -> Path:
    """Write ``root/<category>/{train/ok, test/ok, test/ko, ground_truth/ko}``; return ``root``.

    ``mask_ext`` is ``".png"``, ``".bmp"`` or ``"mixed"`` (alternating, to exercise
    both extensions in one product).
    """
    root = Path(root)
    cat = root / category
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        write_image(cat / "train" / "ok" / f"{i:04d}{image_ext}", normal_image(rng, size))
    for i in range(n_test_ok):
        write_image(cat / "test" / "ok" / f"{i:04d}{image_ext}", normal_image(rng, size))
    for i in range(n_ko):
        img, mask = _defective(rng, size, i)
        ext = mask_ext if mask_ext != "mixed" else (".png", ".bmp")[i % 2]
        write_image(cat / "test" / "ko" / f"{i:04d}{image_ext}", img)
        write_image(cat / "ground_truth" / "ko" / f"{i:04d}{ext}", mask)
    return root


def make_manifest(
    root: str | Path,
    fmt: str = "csv",
    n_train: int = 5,
    n_test_good: int = 2,
    defects: Mapping[str, int] | None = None,
    size: tuple[int, int] = (40, 40),
    seed: int = 0,
    name: str = "parts",
) -> Path:
    """Write images under ``root/images`` and a manifest ``root/<name>.<fmt>``; return its path.

    Paths in the manifest are relative to ``root``. Columns: image, split, label
    (normal/anomaly), mask (anomalous only), defect_type.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train):
        rel = f"images/train/{i:03d}.png"
        write_image(root / rel, normal_image(rng, size))
        rows.append(
            {"image": rel, "split": "train", "label": "normal", "mask": "", "defect_type": ""}
        )
    for i in range(n_test_good):
        rel = f"images/test/good_{i:03d}.png"
        write_image(root / rel, normal_image(rng, size))
        rows.append(
            {"image": rel, "split": "test", "label": "normal", "mask": "", "defect_type": ""}
        )
    for defect, n in (DEFAULT_DEFECTS if defects is None else defects).items():
        for i in range(n):
            img, mask = _defective(rng, size, i)
            rel, mrel = f"images/test/{defect}_{i:03d}.png", f"masks/{defect}_{i:03d}.png"
            write_image(root / rel, img)
            write_image(root / mrel, mask)
            rows.append(
                {
                    "image": rel,
                    "split": "test",
                    "label": "anomaly",
                    "mask": mrel,
                    "defect_type": defect,
                }
            )
    path = root / f"{name}.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        with open(path, "w") as fh:
            for row in rows:
                fh.write(json.dumps({k: v or None for k, v in row.items()}) + "\n")
    else:
        raise ValueError(f"fmt must be csv or jsonl, not {fmt!r}")
    return path


def make_folder_tree(
    root: str | Path,
    n_free: int = 10,
    defects: Mapping[str, int] | None = None,
    n_empty: int = 1,
    size: tuple[int, int] = (40, 56),
    seed: int = 0,
) -> Path:
    """Write a Magnetic-tile-like tree and return ``root``.

    ``MT_Free/Imgs/*.jpg`` normal and ``MT_<Defect>/Imgs/*.jpg`` defective grayscale
    JPEGs, each with a same-stem ``.png`` mask in the same folder (soft values: the
    blob is blurred, so only ``> 127`` recovers it; normal images get all-zero
    masks as in the real set). The last ``n_empty`` images of the last defect type
    get an empty mask. Image sizes vary by a few pixels, as in the real set.
    Default defects: ``{"MT_Blowhole": 3, "MT_Crack": 2}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    defects = {"MT_Blowhole": 3, "MT_Crack": 2} if defects is None else dict(defects)

    def jitter():
        return size[0] + int(rng.integers(0, 5)), size[1] + int(rng.integers(0, 5))

    for i in range(n_free):
        s = jitter()
        write_image(
            root / "MT_Free" / "Imgs" / f"free_{i:03d}.jpg", normal_image(rng, s, gray=True)
        )
        write_image(root / "MT_Free" / "Imgs" / f"free_{i:03d}.png", np.zeros(s, np.uint8))
    last = list(defects)[-1] if defects else None
    for defect, n in defects.items():
        for i in range(n):
            img, mask = _defective(rng, jitter(), i, gray=True)
            soft = cv2.GaussianBlur(mask, (5, 5), 0)
            if defect == last and i >= n - n_empty:
                soft[:] = 0
            write_image(root / defect / "Imgs" / f"{defect.lower()}_{i:03d}.jpg", img)
            write_image(root / defect / "Imgs" / f"{defect.lower()}_{i:03d}.png", soft)
    return root
