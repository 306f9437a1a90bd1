"""A fitted model: detector + map post-processing + thresholds, saved as JSON and arrays.

Folder layout: ``model.json`` (format version, detector name and parameters, post-processing
state, thresholds, provenance), ``arrays.npz`` (learned arrays, loaded with
``allow_pickle=False``) and, for detectors with a neural backbone, ``backbone.pt`` (the exact
backbone tensors the tapped layers use, sha256 recorded; see :mod:`.artifacts`). The folder
is self-contained: it loads from any working directory, on a machine without the original
weights file or a network. Loading never runs code from the folder, and validates what it
reads (finite arrays, shapes consistent with the parameters).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import Thresholds
from .artifacts import load_backbone, save_backbone
from .detectors import Detector, get_detector_class
from .errors import ModelError, PyimganoError
from .outputs.files import check_writable, clean_stale, dumps, temp_path, write_error
from .postprocess import AnomalyMapPostprocess, PostprocessConfig
from .model_doc import check_sha, read_model_json, seal

FORMAT_VERSION = 1


@dataclass
class Model:
    detector: Detector
    postprocess: AnomalyMapPostprocess = field(default_factory=lambda: AnomalyMapPostprocess(PostprocessConfig()))
    thresholds: Thresholds | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write the model folder atomically (a temp folder renamed over the old one).

        Refuses to replace anything that is not a model folder (or an empty folder); removes
        temp folders left by earlier saves that were killed.
        """
        folder = Path(folder)
        check_target(folder)
        arrays, extras = self.detector.state()
        check_writable(folder.parent, "model folder location")
        clean_stale(folder.parent, folder.name)
        tmp = temp_path(folder)
        try:
            tmp.mkdir()  # mode from the umask, like any folder (not mkdtemp's 0700)
            backbone = save_backbone(self.detector, tmp)
            doc = {
                "format_version": FORMAT_VERSION,
                "pyimgano_version": __version__,
                "detector": self.detector.name,
                "params": self.detector.params_.model_dump(mode="json"),
                "state": extras,
                "backbone": backbone,
                "postprocess": self.postprocess.state(),
                "thresholds": self.thresholds.to_dict() if self.thresholds else None,
                "meta": self.meta,
            }
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "model.json").write_text(dumps(seal(json.loads(dumps(doc))), indent=2))  # its own sha256 (model_doc)
            old = temp_path(folder, ".old")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise write_error(exc, f"Cannot save the model to {folder}") from None
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
        doc = read_model_json(meta_path)  # schema and sha256, before any work: one line, exit 4
        try:
            if doc.get("format_version") != FORMAT_VERSION:
                raise ModelError(f"{meta_path}: unsupported model format {doc.get('format_version')!r} (expected {FORMAT_VERSION})")
            cls_ = get_detector_class(doc["detector"])
            params, _ = cls_.Params.upgrade(doc["params"])  # folders saved before nested parameters load unchanged
            det = cls_(**params, **detector_kwargs)
            with np.load(folder / "arrays.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            validate_arrays(doc, arrays)
            det.load_state(arrays, doc["state"])
            if doc.get("backbone") and "embedder" not in detector_kwargs:
                load_backbone(det, folder, doc["backbone"])
                dim = getattr(det.embedder, "target_dim", None)
                if dim is not None and getattr(det, "memory_", None) is not None and det.memory_.shape[1] != dim:
                    raise ModelError(f"arrays.npz: memory_ has {det.memory_.shape[1]} features per patch but the "
                                     f"backbone gives {dim}")
            post = AnomalyMapPostprocess.from_state(doc["postprocess"])
            thr = Thresholds(**doc["thresholds"]) if doc.get("thresholds") else None
            check_sha(doc, meta_path)  # last: the more specific checks above name what is wrong
        except PyimganoError:
            raise
        except Exception as exc:  # noqa: BLE001 - any corruption of the folder
            raise ModelError(f"Cannot load model from {folder}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return cls(det, post, thr, doc.get("meta", {}))


def check_target(folder: Path) -> None:
    """A model may replace a model folder we wrote or an empty folder, nothing else."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ModelError(f"Refusing to replace {folder}: it is not a pyimgano model folder (a file is in the way)")
    if folder.is_dir() and not (folder / "model.json").is_file() and any(folder.iterdir()):
        raise ModelError(f"Refusing to replace {folder}: it is not a pyimgano model folder (no model.json); move it away")


def validate_arrays(doc: dict, arrays: dict[str, np.ndarray]) -> None:
    """Saved arrays must be numeric, finite and shaped as the parameters say (else ModelError)."""
    for name, arr in arrays.items():
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ModelError(f"arrays.npz: {name} has dtype {arr.dtype}, expected numbers")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ModelError(f"arrays.npz: {name} holds {bad} NaN or infinite value(s); the model is corrupt, fit again")
    memory = arrays.get("memory_")
    if memory is not None:
        if memory.ndim != 2 or memory.shape[0] < 1 or memory.shape[1] < 1:
            raise ModelError(f"arrays.npz: memory_ has shape {memory.shape}, expected (n_patches >= 1, feature_dim)")
        dim = doc.get("params", {}).get("target_embed_dim")  # an injected embedder may have its own size
        if doc.get("params", {}).get("feature_aggregation", "reference") != "reference":
            dim = None  # concat: the taps' native channels, checked against the loaded embedder in Model.load
        if doc.get("backbone") and dim is not None and memory.shape[1] != dim:  # embedder built from params
            raise ModelError(f"arrays.npz: memory_ has {memory.shape[1]} features per patch but target_embed_dim is {dim}")
