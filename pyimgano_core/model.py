"""A fitted model: detector + map post-processing + thresholds, saved as JSON and arrays.

Folder layout: ``model.json`` (format version, detector name and parameters, post-processing
state, thresholds, provenance) and ``arrays.npz`` (learned arrays, loaded with
``allow_pickle=False``). Loading never runs code from the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import Thresholds
from .detectors import Detector, get_detector_class
from .errors import ModelError, PyimganoError
from .postprocess import AnomalyMapPostprocess, PostprocessConfig

FORMAT_VERSION = 1


@dataclass
class Model:
    detector: Detector
    postprocess: AnomalyMapPostprocess = field(default_factory=lambda: AnomalyMapPostprocess(PostprocessConfig()))
    thresholds: Thresholds | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write the model folder atomically (a temp folder renamed over the old one)."""
        folder = Path(folder)
        arrays, extras = self.detector.state()
        doc = {
            "format_version": FORMAT_VERSION,
            "pyimgano_version": __version__,
            "detector": self.detector.name,
            "params": self.detector.params_.model_dump(mode="json"),
            "state": extras,
            "postprocess": self.postprocess.state(),
            "thresholds": self.thresholds.to_dict() if self.thresholds else None,
            "meta": self.meta,
        }
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "model.json").write_text(json.dumps(doc, indent=2))
            old = folder.with_name(f".{folder.name}.old")
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, **detector_kwargs: Any) -> "Model":
        """Load a model folder. ``detector_kwargs`` (e.g. an injected ``embedder``) go to the constructor."""
        folder = Path(folder)
        meta_path = folder / "model.json"
        if not meta_path.is_file():
            raise ModelError(f"Not a pyimgano model folder (no model.json): {folder}")
        try:
            doc = json.loads(meta_path.read_text())
            if doc.get("format_version") != FORMAT_VERSION:
                raise ModelError(f"{meta_path}: unsupported model format {doc.get('format_version')!r} (expected {FORMAT_VERSION})")
            det = get_detector_class(doc["detector"])(**doc["params"], **detector_kwargs)
            with np.load(folder / "arrays.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            det.load_state(arrays, doc["state"])
            post = AnomalyMapPostprocess.from_state(doc["postprocess"])
            thr = Thresholds(**doc["thresholds"]) if doc.get("thresholds") else None
        except PyimganoError:
            raise
        except Exception as exc:  # noqa: BLE001 - any corruption of the folder
            raise ModelError(f"Cannot load model from {folder}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return cls(det, post, thr, doc.get("meta", {}))
