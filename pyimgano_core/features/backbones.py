"""torchvision backbones as multi-layer feature extractors.

``FeatureExtractor("wide_resnet50_2", ["layer2", "layer3"], weights="DEFAULT")`` returns the
tapped feature maps; ``channels`` and ``strides`` come from a probe forward pass (never
hard-coded), like timm's ``feature_info``. Weights resolve as in torchvision (weights enum name,
looked up in ``$TORCH_HOME/hub/checkpoints`` before any download) or from a local checkpoint
file, which is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import warnings

import difflib
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def close_names(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def is_path(weights: str) -> bool:
    return any(s in weights for s in ("/", "\\")) or weights.endswith((".pth", ".pt", ".bin"))


def build_torchvision_model(name: str, weights: str | None) -> nn.Module:
    """A torchvision classification model by name, with weights resolved offline-first.

    ``weights``: a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``; torchvision
    looks in its cache before downloading), a path to a local state-dict checkpoint, or
    ``None`` for random initialisation (tests).
    """
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError(f"Unknown torchvision backbone {name!r}.{close_names(name, available)}")
    if weights is None:
        # Seeded, so a random-weights model (tests, ablations) is reproducible and a saved one
        # reloads with identical scores; the global RNG is left untouched.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return torchvision.models.get_model(name, weights=None)
    if is_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"Backbone weights file not found: {path}")
        model = torchvision.models.get_model(name, weights=None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unpickler's protocol notes: the one line below says it
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint of this model"
            raise ModelError(f"Cannot load {path} into {name}: {load_failure(exc)}") from None
        return model
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
        raise ConfigError(f"Unknown weights {weights!r} for {name}. Available: {', '.join(names)}") from None
    try:
        return torchvision.models.get_model(name, weights=w)
    except Exception as exc:  # noqa: BLE001 - network/cache failures
        raise ModelError(
            f"Cannot obtain {name} weights {w} ({str(exc).splitlines()[0]}). Offline? Put the file "
            f"in $TORCH_HOME/hub/checkpoints/ or give a local path in detector.params.weights."
        ) from None


def fuse_conv_bn(body: nn.Module) -> nn.Module:
    """``body`` (a torch.fx GraphModule in eval mode) with every Conv -> BatchNorm pair folded.

    Two passes: torch.fx's ``fuse`` folds pairs in the traced graph (only where the convolution's
    output feeds nothing but the BatchNorm); torchvision's ``Conv2dNormActivation`` blocks are
    leaves of that graph (MobileNetV2: 26 of its 39 BatchNorms), so a Conv2d directly followed by
    a BatchNorm2d inside any ``nn.Sequential`` is folded there (a Sequential runs its children in
    order, so the pair is the same affine map) and the BatchNorm becomes an Identity."""
    from torch.fx.experimental.optimization import fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    body = fuse(body, inplace=True, no_trace=True).eval()
    for seq in [m for m in body.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return body


class FeatureExtractor(nn.Module):
    """Feature maps of named layers of a torchvision model, in the order given.

    Input: float [B, 3, H, W] in [0, 1] RGB; ImageNet normalisation is applied here.
    The network is cut after the deepest tap, so later layers cost nothing.
    """

    def __init__(self, backbone: str, layers: list[str], weights: str | None):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        model = build_torchvision_model(backbone, weights).eval()
        nodes = get_graph_node_names(model)[1]
        modules = dict(model.named_modules())
        for layer in layers:
            if layer not in nodes and layer not in modules:
                options = [n for n in modules if n and "." not in n.split(".", 2)[-1]] or list(modules)
                raise ConfigError(f"Layer {layer!r} not found in {backbone}.{close_names(layer, options)}")
        self.layers = list(layers)
        body = create_feature_extractor(model, return_nodes={layer: layer for layer in layers}).eval()
        # Inference only: each BatchNorm that directly follows a convolution is folded into it
        # (w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta), the
        # same affine map in one pass; fit, predict and export-onnx all see the folded network, and
        # its outputs equal the unfolded one to float rounding (tests/test_backbones.py).
        self.body = fuse_conv_bn(body)
        # channels_last (NHWC) weights and input: oneDNN's convolutions run ~2x faster on CPU in that
        # layout (MobileNetV2 at 224: 14 vs 26 ms on 2 cores); same arithmetic, other summation order.
        self.body.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        with torch.inference_mode():  # probe: channels and strides, like timm's feature_info
            out = self.body(torch.zeros(1, 3, 64, 64))
        self.channels = [int(out[k].shape[1]) for k in self.layers]
        self.strides = [64 // int(out[k].shape[-1]) for k in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
        return [out[k].contiguous() for k in self.layers]


def load_failure(exc: BaseException) -> str:
    """Why a weights file did not load, in our words: torch's unpickler advises re-running with
    ``weights_only=False`` (running code from the file); we never do and never suggest it."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, RuntimeError) and "weights_only" not in text and type(exc).__name__ != "UnpicklingError":
        return text  # load_state_dict: missing / unexpected keys, size mismatches
    return (f"not a checkpoint of plain tensors ({type(exc).__name__}); weights are read as tensors only "
            "(torch.load with weights_only=True), never as pickled code")
