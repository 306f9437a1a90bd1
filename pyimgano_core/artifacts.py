"""Backbone tensors inside a model folder, so the folder is self-contained and movable.

A fitted patch-kNN detector's embedder is a ``torch.nn.Module`` cut after its deepest tapped
layer (``create_feature_extractor`` keeps only the nodes the taps need), so its
``state_dict()`` is exactly the set of backbone tensors the model uses. We save that plain
state dict as ``backbone.pt`` (``torch.save`` of tensors only; read back with
``weights_only=True``, never pickle), record its sha256 in ``model.json`` and, on load, build
the same architecture with random weights (no file, no download) and load the tensors into
it with ``strict=True``. The ``weights`` parameter keeps its original value as provenance.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError, PyimganoError

if TYPE_CHECKING:
    import torch

BACKBONE_FILE = "backbone.pt"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model folders, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_embedder(detector) -> "torch.nn.Module | None":
    """The detector's embedder when it is a module we can rebuild from its parameters."""
    import torch

    if not hasattr(detector, "_make_embedder") or "weights" not in type(detector.params_).model_fields:
        return None
    emb = detector.embedder if detector.embedder is not None else detector._embedder()
    return emb if isinstance(emb, torch.nn.Module) else None


def save_backbone(detector, folder: Path) -> dict[str, Any] | None:
    """Write ``backbone.pt`` into ``folder``; return its record for ``model.json`` (or None)."""
    import torch

    emb = _module_embedder(detector)
    if emb is None:
        return None
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in emb.state_dict().items()}
    path = folder / BACKBONE_FILE
    torch.save(state, path)
    return {"file": BACKBONE_FILE, "sha256": sha256_file(path), "n_tensors": len(state),
            "n_values": int(sum(t.numel() for t in state.values())),
            "source_weights": detector.params_.weights}


def load_backbone(detector, folder: Path, record: dict[str, Any]) -> None:
    """Verify ``backbone.pt`` against its sha256 and install it as the detector's embedder."""
    import torch

    path = folder / record["file"]
    if Path(record["file"]).name != record["file"] or not path.is_file():
        raise ModelError(f"{folder}: backbone tensors {record['file']!r} missing from the model folder")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise ModelError(f"{path}: sha256 {digest[:12]}... does not match model.json ({record['sha256'][:12]}...); "
                         "the model folder is corrupt or was edited")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise ModelError(f"{path}: cannot read backbone tensors ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a plain state dict of tensors")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{path}: backbone tensor {name!r} holds NaN or infinite values")
    # Same architecture, random init (weights=None: no file, no network), then the saved tensors.
    fitted = detector.params_
    detector.params_ = fitted.model_copy(update={"weights": None})
    try:
        emb = detector._make_embedder()
    finally:
        detector.params_ = fitted
    if set(state) != set(emb.state_dict()):
        state = fold_saved_batchnorm(state, set(emb.state_dict()), fitted.backbone)
    try:
        emb.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: backbone tensors do not fit {fitted.backbone}: {str(exc).splitlines()[0]}") from None
    detector.embedder = emb.eval()


def _conv_of(bn: str) -> str | None:
    """The convolution a BatchNorm follows, by torchvision's naming: ``<seq>.<i+1>`` after
    ``<seq>.<i>`` (Sequential blocks), or ``...bnN`` after ``...convN`` (ResNet blocks)."""
    head, _, last = bn.rpartition(".")
    if last.isdigit() and int(last) > 0:
        return f"{head}.{int(last) - 1}"
    if last.startswith("bn"):
        return f"{head}.conv{last[2:]}" if head else f"conv{last[2:]}"
    return None


def fold_saved_batchnorm(state: dict, wanted: set[str], backbone: str) -> dict:
    """Backbone tensors saved by an earlier pyimgano, whose network kept some Conv -> BatchNorm pairs
    unfolded (``<bn>.weight/bias/running_mean/running_var``), folded as today's network holds them
    (``<conv>.weight`` scaled, ``<conv>.bias``): w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta.
    Returns ``state`` unchanged where nothing matches (load_state_dict then names the mismatch)."""
    import torch

    from .features.backbones import build_torchvision_model

    folds = [(k[: -len(".running_mean")], c) for k in state if k.endswith(".running_mean") and k not in wanted
             for c in [_conv_of(k[: -len(".running_mean")])] if c and f"{c}.weight" in state and f"{c}.bias" in wanted]
    if not folds:
        return state
    plain = dict(build_torchvision_model(backbone, None).named_modules())  # each BatchNorm's eps
    out = dict(state)
    for bn, conv in folds:
        mod = plain.get(bn.split("body.", 1)[-1])
        eps = getattr(mod, "eps", 1e-5)
        g, beta, mean, var = (out.pop(f"{bn}.{n}") for n in ("weight", "bias", "running_mean", "running_var"))
        out.pop(f"{bn}.num_batches_tracked", None)
        scale = g / torch.sqrt(var + eps)
        w = out[f"{conv}.weight"]
        out[f"{conv}.weight"] = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        out[f"{conv}.bias"] = (out.get(f"{conv}.bias", torch.zeros_like(mean)) - mean) * scale + beta
    return out


def tensors_sha256(state: dict) -> str:
    """sha256 over a state dict's tensors (sorted names, dtype, shape, values): the same for the
    same weights however the file holding them was spelled or laid out."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype
    return h.hexdigest()


def same_backbone(detector, weights: str | None) -> bool:
    """Whether ``weights`` (a config's ``detector.params.weights``) gives the very tensors of the
    fitted detector's backbone (``backbone.pt``): compared by :func:`tensors_sha256`, not by path."""
    from pydantic import ValidationError

    fitted = getattr(detector, "params_", None)
    if fitted is None or getattr(detector, "embedder", None) is None or "weights" not in type(fitted).model_fields:
        return False
    try:
        detector.params_ = fitted.model_copy(update={"weights": weights})
        emb = detector._make_embedder()
    except (OSError, ValueError, RuntimeError, ValidationError, PyimganoError):
        return False  # a file that cannot be read is not the same backbone
    finally:
        detector.params_ = fitted
    mine, theirs = detector.embedder.state_dict(), emb.state_dict()
    return set(mine) == set(theirs) and tensors_sha256(mine) == tensors_sha256(theirs)
