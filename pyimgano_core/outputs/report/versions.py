"""The versions a report records (float results depend on them)."""
from __future__ import annotations

import platform

import cv2
import numpy as np

from ... import __version__


def versions() -> dict[str, str]:
    import torch  # read where a report is written: the fit ran, so torch is loaded already
    import torchvision

    return {
        "pyimgano": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }
