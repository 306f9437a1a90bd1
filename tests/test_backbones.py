"""Backbones (probe, weights resolution) and PatchCore's patch features vs a reference-style version."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyimgano_core.errors import ConfigError, ModelError
from pyimgano_core.features.backbones import FeatureExtractor, build_torchvision_model, fuse_conv_bn
from pyimgano_core.features.patch_embed import LocalPatchEmbedder

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared/weights/mobilenet_v2-b0353104.pth"


@pytest.mark.parametrize("name,layers,channels,strides", [
    ("resnet18", ["layer2", "layer3"], [128, 256], [8, 16]),
    ("wide_resnet50_2", ["layer2", "layer3"], [512, 1024], [8, 16]),
    ("mobilenet_v2", ["features.6", "features.13"], [32, 96], [8, 16]),
    ("efficientnet_b0", ["features.3", "features.4"], [40, 80], [8, 16]),
    ("convnext_tiny", ["features.3", "features.5"], [192, 384], [8, 16]),
])
def test_probe_finds_channels_and_strides(name, layers, channels, strides):
    fx = FeatureExtractor(name, layers, weights=None)
    assert fx.channels == channels and fx.strides == strides
    out = fx(torch.rand(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in out] == [(c, 64 // s, 96 // s) for c, s in zip(channels, strides)]


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ConfigError, match="Did you mean: wide_resnet50_2"):
        build_torchvision_model("wide_resnet50", None)
    with pytest.raises(ConfigError, match="features.6"):
        FeatureExtractor("mobilenet_v2", ["feature.6"], None)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_torchvision_model("resnet18", "IMAGENET_V9")


def test_local_checkpoint_is_loaded_with_weights_only(tmp_path):
    model = build_torchvision_model("resnet18", None)
    for p in model.parameters():
        p.data.normal_()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    loaded = build_torchvision_model("resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    with pytest.raises(ModelError, match="not found"):
        build_torchvision_model("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ModelError, match="Cannot load"):
        build_torchvision_model("resnet34", str(tmp_path / "r18.pth"))


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="../shared MobileNetV2 checkpoint not present")
def test_offline_mobilenet_checkpoint():
    fx = FeatureExtractor("mobilenet_v2", ["features.6", "features.13"], str(SHARED_WEIGHTS))
    assert fx.channels == [32, 96]


def _reference_embed(maps: list[torch.Tensor], pretrain: int, target: int, k: int = 3) -> torch.Tensor:
    """PatchCore's _embed, step by step as in the reference code: PatchMaker.patchify (padding
    int((k-1)/2), its own patch-count formula) -> (B, L, C, k, k), reshape to per-(C,k,k) spatial
    maps, bilinearly resize deeper layers to the first layer's patch grid, MeanMapper, Aggregator."""
    pad = int((k - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=k, stride=1, padding=pad, dilation=1)
    feats, shapes = [], []
    for f in maps:
        u = unfolder(f)  # (B, C*k*k, L)
        u = u.reshape(*f.shape[:2], k, k, -1).permute(0, 4, 1, 2, 3)  # (B, L, C, k, k)
        feats.append(u)
        shapes.append([int((s + 2 * pad - 1 * (k - 1) - 1) / 1 + 1) for s in f.shape[-2:]])
    ref = shapes[0]
    for i in range(1, len(feats)):
        x = feats[i].reshape(feats[i].shape[0], shapes[i][0], shapes[i][1], *feats[i].shape[2:])
        x = x.permute(0, -3, -2, -1, 1, 2)
        base = x.shape
        x = x.reshape(-1, *x.shape[-2:])
        x = F.interpolate(x.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False).squeeze(1)
        x = x.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
        feats[i] = x.reshape(len(x), -1, *x.shape[-3:])
    feats = [x.reshape(-1, *x.shape[-3:]) for x in feats]
    pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain).squeeze(1) for x in feats]
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target).reshape(len(pooled[0]), -1)


def test_patch_features_match_reference_implementation():
    fx = FeatureExtractor("resnet18", ["layer2", "layer3"], weights=None)
    emb = LocalPatchEmbedder(fx, patch_size=3, pretrain_dim=96, target_dim=64)
    x = torch.rand(2, 3, 64, 80)
    ours = emb(x)
    assert ours.shape == (2, 8, 10, 64)
    ref = _reference_embed(fx(x), 96, 64)
    torch.testing.assert_close(ours.reshape(-1, 64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_patch_features_match_reference_for_any_patch_size(k):
    """Even k as the reference: padding (k-1)//2 on both sides, so the grid is one smaller."""
    fx = FeatureExtractor("resnet18", ["layer2", "layer3"], weights=None)
    emb = LocalPatchEmbedder(fx, patch_size=k, pretrain_dim=96, target_dim=64)
    x = torch.rand(2, 3, 64, 80)
    ours = emb(x)
    grid = (8, 10) if k % 2 else (7, 9)
    assert ours.shape == (2, *grid, 64)
    torch.testing.assert_close(ours.reshape(-1, 64), _reference_embed(fx(x), 96, 64, k), rtol=1e-5, atol=1e-6)


def test_even_patch_size_patchcore_maps_keep_the_input_size():
    from pyimgano_core.detectors import create_detector

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    det = create_detector("patchcore", backbone="resnet18", layers=["layer2", "layer3"], weights=None, image_size=64,
                          crop=None, patch_size=2, pretrain_embed_dim=32, target_embed_dim=32, coreset={"ratio": 1.0})
    pred = det.fit(imgs[:2]).predict(imgs[2:])
    assert pred.maps.shape == (1, 64, 64) and det.n_train_patches_ == 2 * 7 * 7


def test_even_patch_size_on_a_one_pixel_feature_map_is_a_config_error():
    from pyimgano_core.errors import ConfigError

    fx = FeatureExtractor("resnet18", ["layer2"], weights=None)
    with pytest.raises(ConfigError, match="patch_size=2"):  # a 1x1 map has no 2x2 neighbourhood
        LocalPatchEmbedder(fx, patch_size=2, pretrain_dim=16, target_dim=16)(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("length,out", [(288, 1024), (864, 1024), (2048, 1024), (96, 64), (7, 3), (3, 7), (100, 3), (5, 5)])
def test_channel_pooling_equals_adaptive_avg_pool1d(length, out):
    """The gather form of the reference's adaptive pooling (patch_embed.py) gives torch's numbers."""
    from pyimgano_core.features.patch_embed import adaptive_avg_pool_channels

    x = torch.randn(2, length, 5, 6)
    ref = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, length), out).reshape(2, 5, 6, out)
    ours = adaptive_avg_pool_channels(x, out).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def _plain_network(name, layers):
    """The unfolded torchvision network (random init) with non-trivial BatchNorm statistics and
    affine terms, so folding has something to fold; and its plain feature extractor."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build_torchvision_model(name, None).eval()
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                g = torch.Generator().manual_seed(i)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model, create_feature_extractor(model, return_nodes={layer: layer for layer in layers}).eval()


def _assert_same_maps(fx, plain, layers):
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = plain((x - fx.mean) / fx.std)
        ours = fx(x)
    for layer, o in zip(layers, ours):
        # float rounding of a deep network: relative to the layer's scale
        torch.testing.assert_close(o, ref[layer], rtol=1e-4, atol=1e-5 * float(ref[layer].abs().max()))


@pytest.mark.parametrize("name,layers", [("mobilenet_v2", ["features.6", "features.13"]), ("resnet18", ["layer2", "layer3"])])
def test_batchnorm_folding_keeps_the_features(name, layers):
    """The extractor folds BatchNorm into the convolutions: no BatchNorm left, same maps as the plain network."""
    from torchvision.models.feature_extraction import create_feature_extractor

    fx = FeatureExtractor(name, layers, weights=None)
    # none left anywhere: neither in the traced graph nor inside its leaf blocks (Conv2dNormActivation)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fx.body.modules())
    model, plain = _plain_network(name, layers)
    fx.body = fuse_conv_bn(create_feature_extractor(model, return_nodes={layer: layer for layer in layers}).eval())
    _assert_same_maps(fx, plain, layers)


@pytest.mark.parametrize("name,layers", [("mobilenet_v2", ["features.6", "features.13"]), ("resnet18", ["layer2", "layer3"])])
def test_backbone_tensors_of_an_unfolded_network_still_load(name, layers):
    """A model folder saved when the network kept Conv -> BatchNorm pairs (earlier pyimgano) loads into
    today's folded network (artifacts.fold_saved_batchnorm) and gives the plain network's maps."""
    from pyimgano_core.artifacts import fold_saved_batchnorm

    _, plain = _plain_network(name, layers)
    saved = {f"body.{k}": v for k, v in plain.state_dict().items()}  # every BatchNorm still there
    fx = FeatureExtractor(name, layers, weights=None)
    wanted = set(fx.state_dict())
    assert set(saved) != wanted
    fx.load_state_dict(fold_saved_batchnorm(saved, wanted, name), strict=True)
    _assert_same_maps(fx, plain, layers)
