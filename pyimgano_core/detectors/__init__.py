"""Detectors and their registry. Importing this package registers every built-in detector."""
from .base import Detector, DetectorParams, Prediction, create_detector, get_detector_class, list_detectors, register_detector
from . import patchcore  # noqa: F401  (registers)
from . import softpatch  # noqa: F401
from . import anomalydino, openclip_patchknn  # noqa: F401
from . import msflow  # noqa: F401
from . import anomalib_checkpoint  # noqa: F401  (anomalib itself is imported lazily)

__all__ = ["Detector", "DetectorParams", "Prediction", "create_detector", "get_detector_class", "list_detectors", "register_detector"]
