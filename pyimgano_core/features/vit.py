"""Patch-token embedders: DINOv2 and other timm ViTs, OpenCLIP vision towers, CNN layer taps.

Every embedder maps float ``[B, 3, H, W]`` in [0, 1] (RGB) to patch features ``[B, h, w, D]``,
normalising with its own model's mean/std, and tells its ``patch_size``: ``H`` and ``W`` must be
multiples of it (``Geometry(multiple=patch_size)`` crops inputs to that). ViT features are the
last block's patch tokens after the final norm (DINOv2's ``get_intermediate_layers`` default,
used by AnomalyDINO); prefix tokens (class, registers) are dropped.

Backbones are named by family::

    dinov2_vits14 (also _vitb14, _vitl14, _vitg14, and *_reg)   DINOv2 via timm       extra "dino"
    timm:<model name>, e.g. timm:vit_small_patch14_dinov2.lvd142m                      extra "dino"
    openclip:<model>, e.g. openclip:ViT-B-16                    OpenCLIP vision tower  extra "clip"
    torchvision:<name>, e.g. torchvision:mobilenet_v2           CNN taps (no extra; offline stand-in)

``weights``: ``"DEFAULT"`` (the family's pretrained weights, downloaded once into its cache),
a local checkpoint path (read with ``weights_only=True``), ``None`` for a seeded random
initialisation (tests), or, for OpenCLIP, a pretrained tag such as ``"laion2b_s34b_b88k"``.
timm and open_clip are imported only here, when such an embedder is built.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError, OptionalDependencyError
from ..optional import require
from .backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, close_names, is_path

# torch.hub names of the DINOv2 release -> the same weights in timm
DINOV2_TIMM = {
    f"dinov2_vit{s}14{reg}": f"vit_{size}_patch14{reg and '_reg4'}_dinov2.lvd142m"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for reg in ("", "_reg")
}
FAMILIES = ("timm", "openclip", "torchvision")


def parse_backbone(backbone: str) -> tuple[str, str]:
    """``"openclip:ViT-B-16"`` -> ``("openclip", "ViT-B-16")``; DINOv2 hub names map to timm."""
    if backbone in DINOV2_TIMM:
        return "timm", DINOV2_TIMM[backbone]
    family, sep, name = backbone.partition(":")
    if not sep or family not in FAMILIES or not name:
        hint = (close_names(backbone, list(DINOV2_TIMM)) or f" Did you mean 'torchvision:{backbone}' or 'timm:{backbone}'?") if not sep else ""
        raise ValueError(
            f"backbone must be a DINOv2 name ({', '.join(list(DINOV2_TIMM)[:4])}, ...) or "
            f"'<family>:<name>' with family one of {', '.join(FAMILIES)}; got {backbone!r}.{hint}"
        )
    return family, name


class ViTPatchEmbedder(nn.Module):
    """Normalise with the model's own mean/std, check the size, return patch tokens ``[B, h, w, D]``."""

    def __init__(self, patch_size: int, mean, std):
        super().__init__()
        self.patch_size = int(patch_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        H, W = pixels.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self._tokens((pixels - self.mean) / self.std).permute(0, 2, 3, 1).contiguous()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Normalised pixels ``[B, 3, H, W]`` -> last-block patch tokens ``[B, D, h, w]``."""
        raise NotImplementedError


class TimmViTEmbedder(ViTPatchEmbedder):
    """A timm VisionTransformer (DINOv2 by default) at any input size (position embeddings resampled)."""

    def __init__(self, model: nn.Module):
        if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
            raise ConfigError(f"timm model {type(model).__name__} is not a ViT with patch tokens (use torchvision:<name> for CNNs)")
        if not hasattr(model, "forward_intermediates"):
            import timm

            raise OptionalDependencyError(f"timm {timm.__version__} is too old (no forward_intermediates, timm>=1.0); "
                                          'upgrade it: pip install -U "pyimgano[dino]"')
        cfg = model.pretrained_cfg
        super().__init__(model.patch_embed.patch_size[0], cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.model = model.eval().requires_grad_(False)
        self.last = len(model.blocks) - 1

    def _tokens(self, x):
        # norm=True: the final LayerNorm, like DINOv2's get_intermediate_layers(norm=True)
        return self.model.forward_intermediates(x, indices=[self.last], norm=True, output_fmt="NCHW",
                                                intermediates_only=True, stop_early=True)[0]


class OpenCLIPViTEmbedder(ViTPatchEmbedder):
    """An OpenCLIP ``VisionTransformer`` tower; its position embedding is resampled per input grid."""

    def __init__(self, visual: nn.Module):
        super().__init__(visual.patch_size[0], visual.image_mean, visual.image_std)
        self.visual = visual.eval().requires_grad_(False)
        self.last = len(visual.transformer.resblocks) - 1
        self._pos0 = visual.positional_embedding.detach().clone()  # (1 + g0*g0, D), class token first
        self._grid0 = tuple(visual.grid_size)
        self._grid = self._grid0

    def _set_grid(self, grid: tuple[int, int]) -> None:
        if grid == self._grid:
            return
        # bicubic + antialias, as open_clip's resize_pos_embed does when loading at another size
        cls, img = self._pos0[:1], self._pos0[1:]
        img = img.reshape(1, *self._grid0, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=grid, mode="bicubic", antialias=True, align_corners=False)
        pos = torch.cat([cls, img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
        self.visual.positional_embedding = nn.Parameter(pos.to(self.mean.device), requires_grad=False)
        self.visual.grid_size = self._grid = grid

    def _tokens(self, x):
        self._set_grid((x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))
        out = self.visual.forward_intermediates(x, indices=[self.last], stop_early=True, normalize_intermediates=True,
                                                intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"][0]


class CNNTapEmbedder(nn.Module):
    """Tapped CNN layers as patch features: each tap 3x3-averaged (local context, as PatchCore's
    neighbourhood aggregation), resized bilinearly to the first tap's grid, channels concatenated.

    ``patch_size`` is the deepest tap's stride, so every tap's grid divides the input exactly.
    """

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor
        self.patch_size = max(extractor.strides)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pool_and_stack(self.extractor(pixels)).contiguous()


def pool_and_stack(maps: list[torch.Tensor]) -> torch.Tensor:
    """3x3 average pool each tap, resize to the first tap's grid, concatenate: (B, h, w, sum C).

    Plain tensor ops (no inference_mode), so the ONNX graph traces the same function."""
    h, w = maps[0].shape[-2:]
    out = []
    for m in maps:
        m = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, 1).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------- builders
def _seeded(build):
    """Random initialisation reproducible (seed 0) without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def _check_file(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"Backbone weights file not found: {path}")
    return path


def _offline_unless_reachable(host: str = "huggingface.co") -> contextlib.AbstractContextManager:
    """Hub downloads retry for ~50 s when there is no network. Probe the hub once (3 s); when
    it cannot be reached, run the build with ``HF_HUB_OFFLINE=1`` so cached weights still load
    and missing ones fail at once with our one-line error."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return contextlib.nullcontext()
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return contextlib.nullcontext()
    except OSError:
        return _env(HF_HUB_OFFLINE="1")


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables (and huggingface_hub's offline constant, read at its import)."""
    import huggingface_hub.constants as hub

    old, old_hub = {k: os.environ.get(k) for k in values}, hub.HF_HUB_OFFLINE
    os.environ.update(values)
    hub.HF_HUB_OFFLINE = values.get("HF_HUB_OFFLINE") == "1" or old_hub
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_hub
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_timm_vit(name: str, weights: str | None) -> TimmViTEmbedder:
    timm = require("timm", extra="dino")
    if not timm.is_model(name):
        raise ConfigError(f"Unknown timm model {name!r}.{close_names(name, timm.list_models('vit_*'))}")
    if weights is not None and weights != "DEFAULT" and not is_path(weights):
        raise ConfigError(f"weights for {name} must be DEFAULT, a local checkpoint path or null; got {weights!r}")
    overlay = {"file": str(_check_file(weights))} if weights not in (None, "DEFAULT") else None

    def create():
        try:
            # a local file is read by timm with weights_only=True (DINOv2's original key names converted)
            return timm.create_model(name, pretrained=weights is not None, pretrained_cfg_overlay=overlay,
                                     dynamic_img_size=True, num_classes=0)
        except TypeError as exc:
            if "dynamic_img_size" in str(exc):
                raise ConfigError(f"timm model {name} is not a ViT with patch tokens (use torchvision:<name> for CNNs)") from None
            raise

    if weights is None:
        return TimmViTEmbedder(_seeded(create))
    try:
        if weights == "DEFAULT":
            with _offline_unless_reachable():
                model = create()
        else:
            model = create()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, cache or checkpoint failures
        raise ModelError(
            f"Cannot obtain weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Offline? Give a local checkpoint path in detector.params.weights."
        ) from None
    return TimmViTEmbedder(model)


def build_openclip_vit(name: str, weights: str | None) -> OpenCLIPViTEmbedder:
    open_clip = require("open_clip", extra="clip")
    if name not in open_clip.list_models():
        raise ConfigError(f"Unknown OpenCLIP model {name!r}.{close_names(name, open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if weights == "DEFAULT":
        if not tags:
            raise ConfigError(f"OpenCLIP model {name} has no pretrained weights; give a checkpoint path or null")
        weights = "openai" if "openai" in tags else tags[0]
    if weights is not None and weights not in tags and not is_path(weights):
        raise ConfigError(f"Unknown pretrained tag {weights!r} for OpenCLIP {name}. Available: {', '.join(tags)}")
    if weights is not None and weights not in tags:
        weights = str(_check_file(weights))
    try:
        build = lambda: open_clip.create_model(name, pretrained=weights)  # noqa: E731
        if weights is None:
            model = _seeded(build)
        elif weights in tags:
            with _offline_unless_reachable():
                model = build()
        else:
            model = build()
    except Exception as exc:  # noqa: BLE001 - network, cache or checkpoint failures
        raise ModelError(
            f"Cannot obtain OpenCLIP {name} weights {weights!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Give a local checkpoint path in detector.params.weights."
        ) from None
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ConfigError(f"OpenCLIP {name}: only ViT towers (open_clip VisionTransformer) are supported, got {type(visual).__name__}")
    if not hasattr(visual, "forward_intermediates"):
        raise OptionalDependencyError(f"open_clip_torch {getattr(open_clip, '__version__', '?')} is too old (no forward_intermediates); "
                                      'upgrade it: pip install -U "pyimgano[clip]"')
    return OpenCLIPViTEmbedder(visual)


def build_embedder(backbone: str, weights: str | None, layers: list[str] | None = None, device: str = "cpu") -> nn.Module:
    """The patch embedder for a backbone name (see the module docstring), moved to ``device``."""
    family, name = parse_backbone(backbone)
    if family == "timm":
        emb = build_timm_vit(name, weights)
    elif family == "openclip":
        emb = build_openclip_vit(name, weights)
    else:
        if not layers:
            raise ConfigError(f"backbone {backbone}: give the tapped layers in detector.params.layers")
        emb = CNNTapEmbedder(FeatureExtractor(name, layers, weights))
    return emb.to(device)

