"""Test helpers: an injected embedder (no weights) and config writing."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml


class PixelEmbedder:
    """Deterministic patch features from pixels: each 4x4 cell's colours and local contrast.

    float [B, 3, H, W] -> [B, H/4, W/4, 27]; enough to separate planted blobs from texture.
    """

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool2d(pixels, 4)  # (B, 3, h, w)
        sq = F.avg_pool2d(pixels * pixels, 4)
        std = (sq - mean * mean).clamp_min(0).sqrt()
        ctx = F.avg_pool2d(mean, 3, stride=1, padding=1, count_include_pad=False)
        feats = torch.cat([mean, std, ctx, mean - ctx, mean * 2, std * 3, ctx * ctx, mean.abs(), (mean - 0.5) ** 2], 1)
        return feats.permute(0, 2, 3, 1).contiguous()


TINY_CNN = {"backbone": "resnet18", "layers": ["layer1", "layer2"], "weights": None, "image_size": 64, "crop": None,
            "coreset": {"ratio": 0.5}, "pretrain_embed_dim": 64, "target_embed_dim": 64}


def write_config(path: Path, root: Path, detector: str = "patchcore", params: dict | None = None, **extra) -> Path:
    cfg = {"name": "t", "seed": 0, "dataset": {"type": "mvtec_ad", "root": str(root), "category": "all"},
           "detector": {"name": detector, "params": dict(TINY_CNN if params is None else params)}}
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


class PyramidEmbedder:
    """Deterministic multi-scale features from pixels, like a CNN's taps at strides 4, 8, 16.

    float [B, 3, H, W] -> [B, 6, H/s, W/s] per stride s: each cell's colour mean and std.
    """

    def __call__(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in (4, 8, 16):
            mean = F.avg_pool2d(pixels, s)
            std = (F.avg_pool2d(pixels * pixels, s) - mean * mean).clamp_min(0).sqrt()
            out.append(torch.cat([mean, std * 4], 1))
        return out


def run_cli(*args):
    """``pyimgano ARGS`` in-process (typer's CliRunner), every argument as a string."""
    from typer.testing import CliRunner

    from pyimgano_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def small_mvtec_tree(tmp_path_factory) -> Path:
    """A tiny synthetic MVTec-like tree (6 train, 2 good test images) for CLI round trips."""
    from tests.synth import make_mvtec_tree

    return make_mvtec_tree(tmp_path_factory.mktemp("data"), n_train=6, n_test_good=2)


def assert_one_line(res, code: int, *needles: str) -> str:
    """A CLI result that is one line (no traceback) with exit ``code`` and every needle; returns the line."""
    text = res.output.strip()
    assert res.exit_code == code, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text
    return text
