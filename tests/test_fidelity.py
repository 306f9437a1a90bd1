"""Reference mode = the reference code's behaviour, re-implemented step by step on small arrays.

One test (or a few) per issue-13 item: PatchCore/SoftPatch squared distances and map blur
(amazon-science/patchcore-inspection: faiss IndexFlatL2 + RescaleSegmentor), eq. 7 with one
neighbour, paper geometry (torchvision Resize(int) + CenterCrop), V1 weights, AnomalyDINO's
dists2map blur at the original size, its per-category masking table, its few-shot slice, and
the masking threshold of non-DINOv2 towers. Injected embedders: no weights, all fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from pyimgano_core.config import validate_config
from pyimgano_core.data.shots import describe_shots, select_shots
from pyimgano_core.data.types import Sample
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.anomalydino import REFERENCE_MASKING, FoundationPatchParams
from pyimgano_core.detectors.patchcore import CNNPatchParams, PatchCoreParams
from pyimgano_core.errors import ConfigError
from pyimgano_core.features.geometry import Geometry


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CellEmbedder:
    """Per-channel mean and std of each 4x4 cell: float [B, 3, H, W] -> [B, H/4, W/4, 6]."""

    patch_size = 4

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        m = F.avg_pool2d(pixels, 4)
        s = (F.avg_pool2d(pixels * pixels, 4) - m * m).clamp_min(0).sqrt()
        return torch.cat([m, 3 * s], 1).permute(0, 2, 3, 1).contiguous()


def textures(n: int, seed: int, hw=(32, 32), defect: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(rng.normal(120, 25, (*hw, 3)), 0, 255).astype(np.uint8)
        if defect:
            y, x = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
            img[y : y + 8, x : x + 8] = 250
        out.append(img)
    return out


def cell_features(images) -> np.ndarray:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return CellEmbedder()(x).numpy().astype(np.float64)


def nn_sq_dist(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexFlatL2.search(q, 1): squared L2 distance to, and index of, the nearest row."""
    d2 = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    i = d2.argmin(1)
    return d2[np.arange(len(queries)), i], i


# -------------------------------------------------------------------- 3. distance: squared
def reference_patchcore(train, test, sigma=4.0):
    """patchcore-inspection's PatchCore._predict with IdentitySampler, k=1: faiss squared L2,
    mean over the k=1 neighbours, max over patches; RescaleSegmentor: bilinear upsampling of the
    patch grid to the input size (align_corners=False), then scipy gaussian_filter(sigma=4)."""
    bank = cell_features(train).reshape(-1, 6)
    q = cell_features(test)
    B, h, w, _ = q.shape
    d2, _ = nn_sq_dist(q.reshape(-1, 6), bank)
    grid = d2.reshape(B, h, w).astype(np.float32)
    scores = grid.reshape(B, -1).max(1)
    up = F.interpolate(torch.from_numpy(grid)[:, None], size=test[0].shape[:2], mode="bilinear", align_corners=False)[:, 0]
    maps = np.stack([gaussian_filter(m, sigma=sigma) for m in up.numpy()])
    return scores, maps


def patchcore(**kw):
    base = dict(image_size=32, crop=None, resize_mode="squash", coreset={"ratio": 1.0}, batch_size=16)
    return create_detector("patchcore", embedder=CellEmbedder(), **(base | kw))


def test_patchcore_squared_distance_equals_the_reference_pipeline():
    train, test = textures(6, 0), textures(2, 1) + textures(2, 2, defect=True)
    pred = patchcore().fit(train).predict(test)  # distance: squared is the default
    scores, maps = reference_patchcore(train, test)
    # the shared search expands |q - m|^2 in float32: ~1e-6 absolute noise on values ~1e-2
    np.testing.assert_allclose(pred.scores, scores, rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(pred.maps, maps, rtol=1e-3, atol=2e-5)
    eu = patchcore(distance="euclidean").fit(train).predict(test)
    np.testing.assert_allclose(eu.scores, np.sqrt(scores), rtol=1e-3, atol=1e-4)
    assert np.argsort(eu.scores).tolist() == np.argsort(pred.scores).tolist()  # same ranking of images


def test_softpatch_squared_distance_times_weight_equals_the_reference():
    train, test = textures(12, 3), textures(2, 4) + textures(2, 5, defect=True)
    det = create_detector("softpatch", embedder=CellEmbedder(), image_size=32, crop=None, resize_mode="squash",
                          coreset={"ratio": 1.0}, blur_sigma=4.0, batch_size=16).fit(train)
    pred = det.predict(test)
    q = cell_features(test)
    d2, nn = nn_sq_dist(q.reshape(-1, 6), det.memory_.astype(np.float64))
    # reference SoftPatch._predict: image_scores (faiss squared L2) * coreset_weight[indices]
    grid = (d2 * det.memory_weights_[nn]).reshape(len(test), 8, 8).astype(np.float32)
    np.testing.assert_allclose(pred.scores, grid.reshape(len(test), -1).max(1), rtol=1e-3, atol=2e-5)
    up = F.interpolate(torch.from_numpy(grid)[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(pred.maps, np.stack([gaussian_filter(m, 4) for m in up.numpy()]), rtol=1e-3, atol=2e-5)


# -------------------------------------------------------------------- 1. reweight_neighbors=1
def test_reweight_with_one_neighbour_is_the_plain_max():
    train, test = textures(6, 0), textures(2, 1) + textures(2, 2, defect=True)
    plain = patchcore().fit(train).predict(test).scores
    one = patchcore(reweight_neighbors=1).fit(train).predict(test).scores
    np.testing.assert_array_equal(one, plain)
    assert (one > 0).all()  # was 1 - softmax([d]) = 0 for every image
    three = patchcore(reweight_neighbors=3).fit(train).predict(test).scores
    assert (three > 0).all() and (three < plain).all()  # eq. 7: weight in (0, 1)


# -------------------------------------------------------------------- 4. and 5. CNN defaults
def test_cnn_defaults_are_the_papers_geometry_weights_and_distance():
    p = PatchCoreParams()
    assert (p.image_size, p.crop, p.resize_mode, p.weights, p.distance) == (256, 224, "shorter_side", "IMAGENET1K_V1", "squared")
    assert CNNPatchParams.model_fields["resize_mode"].default == "shorter_side"


def test_default_weights_are_what_pretrained_true_loads(monkeypatch):
    """The reference builds models.wide_resnet50_2(pretrained=True), which torchvision maps to
    IMAGENET1K_V1 (the legacy checkpoint wide_resnet50_2-95faca4d.pth); DEFAULT is V2."""
    import torchvision

    from pyimgano_core.features.backbones import build_torchvision_model

    seen, real = [], torchvision.models.get_model

    def spy(name, weights=None, **kw):
        seen.append((name, weights))
        return real("resnet18", weights=None)  # same layer names, no download, fast

    monkeypatch.setattr(torchvision.models, "get_model", spy)
    p = PatchCoreParams()
    build_torchvision_model(p.backbone, p.weights)
    (name, weights), = [s for s in seen if s[1] is not None]
    enum = torchvision.models.get_model_weights("wide_resnet50_2")
    assert name == "wide_resnet50_2" and weights is enum.IMAGENET1K_V1
    assert weights.url.endswith("wide_resnet50_2-95faca4d.pth") and enum.DEFAULT is not enum.IMAGENET1K_V1


@pytest.mark.parametrize("hw", [(900, 900), (600, 800), (1000, 600), (1001, 700), (437, 1311), (256, 300)])
def test_shorter_side_resize_and_centre_crop_match_torchvision(hw):
    """The reference's transforms.Resize(256) + CenterCrop(224): output size of the resize and
    the crop's top-left corner, read off a coordinate image (nearest resize keeps values)."""
    from torchvision import transforms

    g = Geometry(size=256, crop=224, mode="shorter_side")
    h, w = hw
    rh, rw = transforms.Resize(256, antialias=True)(torch.zeros(1, h, w)).shape[-2:]
    assert g.resized_hw(hw) == (rh, rw)
    coords = torch.arange(rh * rw, dtype=torch.float64).view(1, rh, rw)
    top_left = int(transforms.CenterCrop(224)(coords)[0, 0, 0])
    y0, x0, y1, x1 = g.box(hw)
    assert (round(y0 * rh / h), round(x0 * rw / w)) == divmod(top_left, rw)
    assert (round((y1 - y0) * rh / h), round((x1 - x0) * rw / w)) == (224, 224) == g.apply(np.zeros((h, w, 3), np.uint8)).shape[:2]


# -------------------------------------------------------------------- 6. AnomalyDINO blur
def dino(**kw):
    base = dict(image_size=80, resize_mode="shorter_side", blur_sigma=4.0, batch_size=8)
    return create_detector("anomalydino", embedder=CellEmbedder(), **(base | kw))


def test_anomalydino_blur_at_original_equals_dists2map():
    """run_anomaly_detection step by step: L2-normalised bank, faiss squared L2 / 2 (= 1 - cos),
    image score mean_top1p, map = dists2map (cv2.resize to the original size, gaussian_filter 4)."""
    import cv2

    train, test = textures(2, 6, hw=(100, 150)), textures(1, 7, hw=(100, 150)) + textures(1, 8, hw=(100, 150), defect=True)
    pred = dino().fit(train).predict(test)  # blur_at: original is the default
    bank = cell_features(np.stack([cv2.resize(t, (120, 80), interpolation=cv2.INTER_AREA) for t in train])).reshape(-1, 6)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = cell_features(np.stack([cv2.resize(t, (120, 80), interpolation=cv2.INTER_AREA) for t in test]))
    for i in range(len(test)):
        f = q[i].reshape(-1, 6)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        d = nn_sq_dist(f, bank)[0] / 2
        n = int(len(d) * 0.01)  # mean_top1p: 600 patches -> top 6
        assert pred.scores[i] == pytest.approx(np.mean(np.sort(d)[::-1][:n]), rel=1e-4, abs=1e-6)
        ref_map = gaussian_filter(cv2.resize(d.reshape(20, 30), (150, 100), interpolation=cv2.INTER_LINEAR), sigma=4)
        assert pred.maps[i].shape == (100, 150)
        np.testing.assert_allclose(pred.maps[i], ref_map, rtol=1e-3, atol=1e-5)
    at_input = dino(blur_at="input").fit(train).predict(test)
    assert at_input.maps[0].shape == (80, 120)  # blurred at the model input; the engine resizes it


def test_blur_at_original_maps_cover_the_box_when_cropped_to_the_patch_multiple():
    train = textures(2, 9, hw=(48, 70))  # shorter side 32 -> 32 x 46, cropped to 32 x 44
    det = dino(image_size=32).fit(train)
    pred = det.predict(train[:1])
    y0, x0, y1, x1 = det.geometry.box((48, 70))
    assert pred.maps[0].shape == (round(y1) - round(y0), round(x1) - round(x0))


# -------------------------------------------------------------------- 9. masking table
def test_reference_masking_table_is_the_references():
    masked = {c for c, on in REFERENCE_MASKING.items() if on}
    assert masked == {"capsule", "hazelnut", "pill", "screw", "toothbrush", "candle", "capsules", "cashew", "chewinggum",
                      "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"}
    assert len(REFERENCE_MASKING) == 15 + 12
    for cat in ("capsule", "bottle"):
        assert FoundationPatchParams(masking="reference", category=cat).masking_on() is REFERENCE_MASKING[cat]


def test_masking_reference_follows_the_category_through_the_engine():
    cfg = validate_config({"name": "x", "dataset": {"type": "mvtec_ad", "root": "d", "category": "all"},
                           "detector": {"name": "anomalydino", "params": {"masking": "reference"}}})
    assert "category" not in cfg.detector.params
    assert cfg.detector_params("screw")["category"] == "screw"
    train = textures(2, 10, hw=(48, 48))
    masked = dino(image_size=48, masking="reference", category="hazelnut", mask_threshold=0.5).fit(train)
    plain = dino(image_size=48, masking="reference", category="bottle", mask_threshold=0.5).fit(train)
    assert masked._batch_fg is not None and plain._batch_fg is None
    with pytest.raises(ConfigError, match="masking=reference"):
        dino(image_size=48, masking="reference", category="widget").fit(train)
    with pytest.raises(ConfigError, match="detector.params.category"):
        validate_config({"name": "x", "dataset": {"type": "mvtec_ad", "root": "d", "category": "all"},
                         "detector": {"name": "anomalydino", "params": {"category": "screw"}}})


# -------------------------------------------------------------------- 10. mask threshold units
@pytest.mark.parametrize("detector, params", [
    ("openclip_patchknn", {"masking": True}),
    ("anomalydino", {"backbone": "torchvision:mobilenet_v2", "layers": ["features.6"], "masking": True}),
    ("anomalydino", {"backbone": "timm:vit_small_patch16_224", "masking": "reference"}),
])
def test_masking_needs_an_explicit_threshold_outside_dinov2(detector, params):
    cfg = {"name": "x", "dataset": {"type": "mvtec_ad", "root": "d", "category": "all"},
           "detector": {"name": detector, "params": params}}
    with pytest.raises(ConfigError, match="mask_threshold"):
        validate_config(cfg)
    cfg["detector"]["params"] = params | {"mask_threshold": 3.0}
    assert validate_config(cfg).detector.params["mask_threshold"] == 3.0


def test_dinov2_masking_keeps_the_references_threshold():
    assert FoundationPatchParams(masking=True).threshold() == 10.0
    assert FoundationPatchParams(masking=True, mask_threshold=4.0).threshold() == 4.0


# -------------------------------------------------------------------- 8. few-shot protocol
def test_reference_shots_are_the_sorted_slice():
    names = [f"{i:03d}.png" for i in range(10)]
    shuffled = [names[i] for i in np.random.default_rng(0).permutation(10)]
    train = [Sample(path=Path(f"/d/bottle/train/good/{n}"), label=0) for n in shuffled]
    for seed in (0, 1, 2):
        got = [s.path.name for s in select_shots(train, 3, seed)]  # reference is the default
        assert got == sorted(names)[seed * 3 : (seed + 1) * 3]
    with pytest.raises(ConfigError, match="shots_protocol=reference"):
        select_shots(train, 3, 3)  # images 9..11 of 10
    rnd = select_shots(train, 3, 0, "random")
    pick = np.sort(np.random.default_rng(0).choice(10, size=3, replace=False))
    assert rnd == [train[i] for i in pick]
    assert "reference protocol" in describe_shots(3, 1, "reference") and "[3:6]" in describe_shots(3, 1, "reference")
    assert describe_shots(None, 0, "reference") is None
