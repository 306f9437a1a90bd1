"""Run an anomalib-trained model (torch export ``.pt`` or Lightning ``.ckpt``) without retraining.

``fit`` only loads the checkpoint; ``predict`` feeds each image through the checkpoint's own
pre-processing transform and its inner torch model, and returns anomalib's RAW
``InferenceBatch.pred_score`` / ``anomaly_map``. anomalib's ``PostProcessor`` (min-max +
threshold normalisation clamped to [0, 1]) is bypassed: clamping ties the highest scores and
the values depend on thresholds anomalib fitted on its own validation split, while pyimgano
calibrates its own thresholds. See docs/anomalib.md.

The resize is the checkpoint's ``pre_processor.transform`` (torchvision, antialiased), the one
anomalib trains and evaluates with (``Engine.fit/test/predict``). The exported module's own
``forward`` uses ``export_transform`` instead (antialias off, for ONNX), which gives other
numbers whenever images are downscaled; we do not call it.

Security: a ``.pt`` export is a pickled Python object (``torch.load(weights_only=False)``) and
can run code while loading, so it loads only with ``trust_checkpoint: true``. anomalib >= 2.7
Lightning checkpoints load under ``weights_only=True`` (tensors and plain data only); an older
``.ckpt`` that needs full unpickling is refused the same way unless trusted.

anomalib is an optional extra, imported only when a checkpoint is loaded.
"""
from __future__ import annotations

import inspect
import pickletools
import time
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from ..artifacts import sha256_file
from ..errors import ConfigError, DataError, ModelError
from ..features.geometry import Geometry
from ..optional import require
from .base import Detector, DetectorParams, Prediction, register_detector
from ..data.io import read_image

PICKLE_SUFFIXES = (".pt", ".pth")
LIGHTNING_SUFFIXES = (".ckpt",)


class AnomalibCheckpointParams(DetectorParams):
    checkpoint: Path = Field(description="anomalib torch export (.pt, from engine.export(model, 'torch')) or Lightning .ckpt")
    model: str | None = Field(None, description="expected anomalib model class, e.g. Padim or padim; checked against the checkpoint")
    image_size: int | tuple[int, int] | None = Field(
        None, description="model input size; None: the checkpoint's own pre-processing size (256 when it has none)"
    )
    device: Literal["cpu", "cuda", "auto"] = "auto"
    trust_checkpoint: bool = Field(False, description="allow unpickling a checkpoint (it can execute code)")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, description="accepted for the common config; unused (nothing is trained or sampled)")


def _norm_name(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def peek_pickled_class(path: Path) -> str | None:
    """Class name of ``obj["model"]`` in a torch zip checkpoint, read without unpickling.

    anomalib's ``to_torch`` saves ``{"model": <AnomalibModule>}``; the first global the pickle
    references is that module's class. Walking the opcodes executes nothing, so a mismatch is
    reported before any trust decision. Returns None when the file is not in that layout.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            data = zf.read(name)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                return str(arg).split(" ")[-1]
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return strings[-1]
            if isinstance(arg, str):
                strings.append(arg)
    except (zipfile.BadZipFile, ValueError, OSError, KeyError):
        return None
    return None


def _geometry_from_transform(transform) -> tuple[Any, Any]:
    """(resize size, centre-crop size) of an anomalib pre-processing transform, None if absent."""
    from torchvision.transforms import v2

    resize = crop = None
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    for t in steps:
        if isinstance(t, v2.Resize):
            resize = t.size
        elif type(t).__name__ in ("CenterCrop", "ExportableCenterCrop"):
            crop = t.size
    return resize, crop


def _as_pair_or_int(size) -> int | tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    size = list(size)
    return size[0] if len(size) == 1 else (int(size[0]), int(size[1]))


@register_detector
class AnomalibCheckpoint(Detector):
    """Scores and maps from an anomalib checkpoint, before anomalib's post-processing."""

    name = "anomalib_checkpoint"
    Params = AnomalibCheckpointParams
    #: anomalib class name an alias expects (None: any model).
    anomalib_model: ClassVar[str | None] = None

    # -- loading -------------------------------------------------------------------------
    def _expected_model(self) -> str | None:
        p, preset = self.params_, self.anomalib_model
        if p.model and preset and _norm_name(p.model) != _norm_name(preset):
            raise ConfigError(f"detector {self.name} runs {preset} checkpoints; remove model={p.model!r} or use anomalib_checkpoint")
        return p.model or preset

    def _device(self):
        import torch

        want = self.params_.device
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA device; use device: cpu or auto")
        return torch.device(want)

    def _check_class(self, path: Path, found: str | None, expected: str | None, mro: list[str] | None = None) -> None:
        if expected is None or found is None:
            return
        names = mro or [found]
        if not any(_norm_name(n) == _norm_name(expected) for n in names):
            raise ModelError(f"checkpoint {path} holds an anomalib {found} model, but {self.name} expects {expected}")

    def _untrusted(self, path: Path, why: str) -> ConfigError:
        return ConfigError(
            f"checkpoint {path} {why}, and unpickling can execute arbitrary code; "
            "if you trust its source set detector.params.trust_checkpoint: true"
        )

    def _load_module(self):
        """Load the checkpoint into an anomalib ``AnomalibModule`` in eval mode."""
        p = self.params_
        expected = self._expected_model()
        path = Path(p.checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(f"anomalib checkpoint not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in PICKLE_SUFFIXES + LIGHTNING_SUFFIXES:
            raise ConfigError(
                f"checkpoint {path}: unsupported type {suffix!r}; use anomalib's torch export (.pt) or a Lightning .ckpt"
            )
        if suffix in PICKLE_SUFFIXES:
            # Cheap, code-free checks first: a wrong model is reported without any unpickling.
            self._check_class(path, peek_pickled_class(path), expected)
            if not p.trust_checkpoint:
                raise self._untrusted(path, "is a pickled torch export (torch.load(weights_only=False))")
        require("anomalib", extra="anomalib")
        device = self._device()
        module = self._load_pickled(path, device) if suffix in PICKLE_SUFFIXES else self._load_lightning(path, expected, device)
        mro = [c.__name__ for c in type(module).__mro__]
        self._check_class(path, type(module).__name__, expected, mro)
        return module.to(device).eval(), device, path

    def _load_pickled(self, path: Path, device):
        import torch

        try:
            obj = torch.load(path, map_location=device, weights_only=False)  # nosec: opt-in above
        except Exception as exc:  # corrupt file, missing classes of another anomalib version
            raise ModelError(f"cannot load anomalib checkpoint {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        module = obj.get("model") if isinstance(obj, dict) else obj
        if not (isinstance(module, torch.nn.Module) and isinstance(getattr(module, "model", None), torch.nn.Module)):
            raise ModelError(f"checkpoint {path} is not an anomalib torch export (expected {{'model': AnomalibModule}})")
        return module

    def _load_lightning(self, path: Path, expected: str | None, device):
        import pickle

        import anomalib.models as am

        if expected is None:
            raise ConfigError(
                f"checkpoint {path} is a Lightning .ckpt, which does not record its model class; "
                "set detector.params.model (e.g. padim) or use an alias such as padim_anomalib"
            )
        cls = next((getattr(am, n) for n in am.__all__ if _norm_name(n) == _norm_name(expected)), None)
        if cls is None:
            raise ConfigError(f"unknown anomalib model {expected!r}; this anomalib has: {', '.join(sorted(am.__all__))}")
        # Weights come from the state dict: don't let the constructor fetch pretrained weights.
        init = inspect.signature(cls.__init__).parameters
        overrides = {k: False for k in ("pre_trained", "evaluator", "visualizer") if k in init}
        try:
            try:
                return self._load_strict_model(cls, path, device, True, overrides)
            except pickle.UnpicklingError:
                if not self.params_.trust_checkpoint:
                    raise self._untrusted(path, "holds Python objects beyond tensors and plain data") from None
                return self._load_strict_model(cls, path, device, False, overrides)
        except (RuntimeError, TypeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"checkpoint {path} does not load as an anomalib {cls.__name__} model: {first}") from None

    @staticmethod
    def _load_strict_model(cls, path: Path, device, weights_only: bool, overrides: dict):
        """``load_from_checkpoint`` that is strict about the model, lenient about metrics.

        We rebuild without evaluator/visualizer, but a checkpoint trained with one (e.g. AUPRO's
        ``fpr_limit`` buffer) stores their state: a plain strict load then fails on those keys.
        So load non-strictly and compare every other key ourselves.
        """
        import torch

        module = cls.load_from_checkpoint(path, map_location=device, weights_only=weights_only, strict=False, **overrides)
        saved = torch.load(path, map_location="cpu", weights_only=weights_only).get("state_dict", {})
        ignored = ("evaluator.", "visualizer.")
        ours = {k for k in module.state_dict() if not k.startswith(ignored)}
        theirs = {k for k in saved if not k.startswith(ignored)}
        if ours != theirs:
            raise RuntimeError(f"missing keys {sorted(ours - theirs)[:3]}, unexpected keys {sorted(theirs - ours)[:3]}")
        return module

    def _setup(self, module, device, path: Path) -> None:
        p = self.params_
        pre = getattr(module, "pre_processor", None)
        self.transform_ = getattr(pre, "transform", None) if pre is not None else None
        resize, crop = _geometry_from_transform(self.transform_) if self.transform_ is not None else (None, None)
        resize = _as_pair_or_int(resize)
        if p.image_size is not None and resize is not None:
            want = p.image_size if isinstance(p.image_size, int) else tuple(p.image_size)
            have = resize if isinstance(resize, int) else tuple(resize)
            if want != have:
                raise ConfigError(
                    f"image_size={p.image_size} but checkpoint {path} was trained at {have}; remove image_size or set it to {have}"
                )
        size = resize if resize is not None else (p.image_size or 256)
        mode = "shorter_side" if isinstance(size, int) and resize is not None else "squash"
        self.geometry_ = Geometry(size=size, crop=_as_pair_or_int(crop), mode=mode)
        self.module_, self.device_, self.checkpoint_path_ = module, device, path.resolve()
        self.model_class_ = type(module).__name__

    def _fit(self, images: list) -> None:
        # Nothing is learned: the anomalib model is used as trained. Calibration happens in the engine.
        t0 = time.perf_counter()
        module, device, path = self._load_module()
        self._setup(module, device, path)
        self.checkpoint_sha256_ = sha256_file(self.checkpoint_path_)
        self.timing_["load_s"] = time.perf_counter() - t0

    # -- inference -----------------------------------------------------------------------
    def _to_input(self, item):
        """Original-size RGB image -> model input tensor [3, h, w] (checkpoint's own transform)."""
        import torch
        import torch.nn.functional as F

        image = read_image(item) if isinstance(item, (str, Path)) else np.asarray(item)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"images must be HxWx3 uint8 RGB arrays or paths, got {image.dtype} {image.shape}")
        hw = image.shape[:2]
        # Same float conversion as anomalib's read_image (to_dtype(..., scale=True)).
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        if self.transform_ is not None:
            x = self.transform_(x)
        else:
            x = F.interpolate(x[None], size=self.geometry_.input_hw(hw), mode="bilinear", antialias=True, align_corners=False)[0]
        # Shorter-side resizes may differ from Geometry's rounding by one pixel; more is a real mismatch.
        if any(abs(a - b) > 1 for a, b in zip(x.shape[-2:], self.geometry_.input_hw(hw))) or x.ndim != 3:
            raise ModelError(
                f"checkpoint pre-processing gives {tuple(x.shape[-2:])} inputs, expected {self.geometry_.input_hw(hw)}; "
                "transforms other than Resize/CenterCrop/Normalize are not supported"
            )
        return x, self.geometry_.box(hw), hw

    def _run(self, inputs: list):
        import torch

        with torch.inference_mode():
            out = self.module_.model(torch.stack(inputs).to(self.device_))
        score, amap = getattr(out, "pred_score", None), getattr(out, "anomaly_map", None)
        if score is None and amap is None:
            raise ModelError(f"{self.model_class_} returned {type(out).__name__}, not an anomalib InferenceBatch")
        if amap is not None:
            amap = amap.float().reshape(len(inputs), *amap.shape[-2:])
        if score is None:  # what anomalib's PostProcessor does for map-only models
            score = torch.amax(amap, dim=(-2, -1))
        score = score.float().reshape(len(inputs))
        return score.cpu().numpy(), (amap.cpu().numpy() if amap is not None else None)

    def _predict(self, images: list) -> Prediction:
        bs = self.params_.batch_size
        timing = dict(load_s=0.0, model_s=0.0)
        scores, maps, boxes, hws = [], [], [], []
        pending: list = []

        def flush():
            t0 = time.perf_counter()
            s, m = self._run([x for x, _, _ in pending])
            timing["model_s"] += time.perf_counter() - t0
            scores.append(s)
            maps.extend(m if m is not None else [None] * len(s))
            boxes.extend(b for _, b, _ in pending)
            hws.extend(h for _, _, h in pending)
            pending.clear()

        for item in images:
            t0 = time.perf_counter()
            x = self._to_input(item)
            timing["load_s"] += time.perf_counter() - t0
            if pending and x[0].shape != pending[0][0].shape:
                flush()
            pending.append(x)
            if len(pending) == bs:
                flush()
        if pending:
            flush()
        if not scores:
            return Prediction(np.zeros(0, np.float32), None, np.zeros((0, 4)), np.zeros((0, 2), np.int64), timing)
        if maps[0] is None:
            out_maps = None
        elif len({m.shape for m in maps}) == 1:
            out_maps = np.stack(maps).astype(np.float32, copy=False)
        else:
            out_maps = [m.astype(np.float32, copy=False) for m in maps]
        return Prediction(
            scores=np.concatenate(scores).astype(np.float32),
            maps=out_maps,
            boxes=np.asarray(boxes, dtype=np.float64),
            orig_hw=np.asarray(hws, dtype=np.int64),
            timing=timing,
        )

    # -- persistence: the checkpoint path and its hash, never the model itself -------------
    def state(self):
        self.check_fitted()
        return {}, {
            "checkpoint": str(self.checkpoint_path_),
            "checkpoint_sha256": self.checkpoint_sha256_,
            "model_class": self.model_class_,
        }

    def load_state(self, arrays: dict[str, np.ndarray], extras: dict[str, Any]) -> None:
        super().load_state(arrays, extras)
        saved = Path(extras.get("checkpoint") or self.params_.checkpoint)
        self.params_ = self.params_.model_copy(update={"checkpoint": saved})
        if not saved.is_file():
            raise ModelError(f"the saved model refers to anomalib checkpoint {saved}, which no longer exists")
        digest = sha256_file(saved)
        if extras.get("checkpoint_sha256") and digest != extras["checkpoint_sha256"]:
            raise ModelError(f"anomalib checkpoint {saved} changed since the model was saved (sha256 differs); fit again")
        module, device, path = self._load_module()
        self._setup(module, device, path)
        self.checkpoint_sha256_ = digest
        if extras.get("model_class") and extras["model_class"] != self.model_class_:
            raise ModelError(f"checkpoint {saved} now holds {self.model_class_}, the saved model used {extras['model_class']}")


def _alias(detector_name: str, model_class: str) -> type[AnomalibCheckpoint]:
    cls = type(
        f"{model_class}Anomalib",
        (AnomalibCheckpoint,),
        {
            "name": detector_name,
            "anomalib_model": model_class,
            "__doc__": f"anomalib {model_class} checkpoint (torch export or Lightning .ckpt), raw scores and maps.",
            "__module__": __name__,
        },
    )
    return register_detector(cls)


#: registry alias -> anomalib model class; every class exists in anomalib 2.7.
ALIASES = {
    "dinomaly_anomalib": "Dinomaly",
    "efficientad_anomalib": "EfficientAd",
    "patchcore_anomalib": "Patchcore",
    "padim_anomalib": "Padim",
    "cfa_anomalib": "Cfa",
    "fastflow_anomalib": "Fastflow",
    "draem_anomalib": "Draem",
    "reverse_distillation_anomalib": "ReverseDistillation",
}
for _name, _cls in ALIASES.items():
    globals()[f"{_cls}Anomalib"] = _alias(_name, _cls)
