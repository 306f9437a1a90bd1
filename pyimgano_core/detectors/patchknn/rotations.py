"""Rotated copies of training images for the memory bank (bank augmentation, AnomalyDINO's and PatchCore's)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ...data.io import read_image

ANOMALYDINO_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)  # the AnomalyDINO reference code's augmentation


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the image centre, same size, reflected border (the AnomalyDINO reference augmentation)."""
    h, w = image.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(image, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


class RotatedImages(Sequence):
    """Each image under every angle, decoded and rotated lazily (8x the images would not fit in memory)."""

    def __init__(self, images: list, angles: Sequence[float] = ANOMALYDINO_ANGLES):
        self.images, self.angles = images, tuple(angles)

    def __len__(self) -> int:
        return len(self.images) * len(self.angles)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self.images[i // len(self.angles)]
        image = read_image(item) if not isinstance(item, np.ndarray) else item
        return rotate(image, self.angles[i % len(self.angles)])
