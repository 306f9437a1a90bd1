"""AnomalyDINO and OpenCLIP patch kNN: memory bank, masking, rotation, embedders, CLI end to end.

Unit tests inject a deterministic embedder (no weights). The end-to-end tests build a DINOv2
ViT-S/14 and an OpenCLIP ViT-B/32 with random weights (timm / open_clip_torch must be installed,
else they skip with the reason) and run ``pyimgano eval`` on a synthetic MVTec-like tree.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.config import validate_config
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.anomalydino import ROTATION_ANGLES, RotatedImages, foreground_mask
from pyimgano_core.errors import ConfigError, ModelError, OptionalDependencyError
from tests.helpers import PixelEmbedder, write_config
from tests.synth import make_mvtec_tree, normal_image, plant_blob

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors here: one intra-op thread avoids thread-barrier stalls on a busy 2-core
    machine (measured: 2688 greedy-coreset picks took 23 s on 2 threads, 0.4 s on 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def images(n, seed, size=(48, 56), defect=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = normal_image(rng, size)
        if defect:
            plant_blob(img, rng, bright=True)
        out.append(img)
    return out


# ------------------------------------------------------------------------------ memory bank
@pytest.mark.parametrize("method", ["exact", "random"])
def test_subsampling_shrinks_the_bank_deterministically(method):
    train = images(4, 0)
    full = create_detector("anomalydino", embedder=PixelEmbedder(), image_size=48).fit(train)
    n = full.n_train_patches_
    assert n == 4 * 12 * 14 and full.memory_.shape == (n, 27)  # 48x56 -> 12x14 cells of 4 px
    np.testing.assert_allclose(np.linalg.norm(full.memory_, axis=1), 1.0, rtol=1e-5)  # L2-normalised

    def bank(seed):
        kw = dict(image_size=48, coreset={"ratio": 0.25, "method": method}, seed=seed)
        return create_detector("anomalydino", embedder=PixelEmbedder(), **kw).fit(train).memory_

    a, b, c = bank(0), bank(0), bank(1)
    assert a.shape == (n // 4, 27)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # every kept entry is one of the full bank's rows
    assert np.abs(a[:, None, :] - full.memory_[None]).max(-1).min(1).max() < 1e-6


def test_scores_are_cosine_top1pct_and_reruns_identical():
    train, test = images(4, 0), images(2, 1) + images(2, 2, defect=True)
    kw = dict(embedder=PixelEmbedder(), image_size=48, rotation=True, coreset={"ratio": 0.5, "method": "random"},
              masking=True, mask_threshold=0.5)  # greedy determinism: test_subsampling_shrinks_the_bank_deterministically
    p1 = create_detector("anomalydino", **kw).fit(train).predict(test)
    p2 = create_detector("anomalydino", **kw).fit(train).predict(test)
    np.testing.assert_array_equal(p1.scores, p2.scores)
    np.testing.assert_array_equal(p1.maps, p2.maps)

    det = create_detector("anomalydino", embedder=PixelEmbedder(), image_size=48).fit(train)
    feats = PixelEmbedder()(torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).float() / 255).numpy()
    fn = feats.reshape(4, -1, 27) / np.linalg.norm(feats.reshape(4, -1, 27), axis=-1, keepdims=True)
    dist = 1 - (fn @ det.memory_.T).max(-1)  # (4, 168) brute-force cosine distance to the nearest
    k = int(168 * 0.01)  # 1 patch: truncated, as the reference's mean_top1p
    expected = -np.sort(-dist, axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(det.predict(test).scores, expected, atol=1e-5)


def test_rotation_augments_each_reference_image_eight_times():
    img = images(1, 0, size=(40, 40))[0]
    rot = RotatedImages([img])
    assert len(rot) == 8 and len(rot[:3]) == 3
    np.testing.assert_array_equal(rot[0], img)
    # Turned about (w/2, h/2) as the reference code (not the pixel-centre (w-1)/2): a 90 degree
    # turn is np.rot90 moved down one row (compared away from the reflected border).
    np.testing.assert_array_equal(rot[2][1:-1, 1:-1], np.roll(np.rot90(img, k=1), 1, axis=0)[1:-1, 1:-1])
    det = create_detector("anomalydino", embedder=PixelEmbedder(), image_size=40, rotation=True).fit([img, img])
    assert det.n_train_patches_ == 2 * len(ROTATION_ANGLES) * 10 * 10


# ------------------------------------------------------------------------------ foreground masking
def disk_tokens(sign: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    disk = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 3.5**2
    v = rng.normal(size=16)
    return disk, rng.normal(0, 0.5, (12, 12, 16)) + sign * 30 * disk[..., None] * v / np.linalg.norm(v)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grid_morphology_mask_is_the_dilated_object(sign):
    disk, tokens = disk_tokens(sign)
    # The PCA sign is arbitrary; the centre test flips it so the centred object is foreground.
    expected = binary_dilation(disk, np.ones((3, 3), bool))  # closing leaves a convex blob as it is
    np.testing.assert_array_equal(foreground_mask(tokens, threshold=10.0, morphology="grid"), expected)


def raster_morphology(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation then 3x3 closing of a (N, 1) column, written out in 1-D: out-of-range
    neighbours are ignored (OpenCV's default border for dilate and erode)."""
    def dilate(a):
        p = np.pad(a, 1, constant_values=False)
        return p[:-2] | p[1:-1] | p[2:]

    def erode(a):
        p = np.pad(a, 1, constant_values=True)
        return p[:-2] & p[1:-1] & p[2:]

    return erode(dilate(dilate(mask.ravel()))).reshape(mask.shape)


def reference_background_mask(tokens: np.ndarray, threshold=10.0, border=0.2) -> np.ndarray:
    """AnomalyDINO's compute_background_mask step by step: sklearn PCA(1) of the (N, D) tokens,
    threshold, centre test with sign flip, cv2 dilate + close on the (N, 1) column it yields."""
    import cv2
    from sklearn.decomposition import PCA

    h, w, D = tokens.shape
    first_pc = PCA(n_components=1).fit_transform(tokens.reshape(-1, D).astype(np.float32))  # (N, 1)
    mask = first_pc > threshold
    m = mask.reshape(h, w)[int(h * border):int(h * (1 - border)), int(w * border):int(w * (1 - border))]
    if m.sum() <= m.size * 0.35:
        mask = -first_pc > threshold
    k = np.ones((3, 3), np.uint8)
    mask = cv2.dilate(mask.astype(np.uint8), k).astype(bool)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
    return mask.squeeze().reshape(h, w)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_raster_morphology_mask_equals_the_reference_step_by_step(sign):
    disk, tokens = disk_tokens(sign)
    ours = foreground_mask(tokens, threshold=10.0)  # default: the reference's raster morphology
    np.testing.assert_array_equal(ours, reference_background_mask(tokens))
    # ... which is 1-D along raster order: each row's run grows by one patch left and right only
    np.testing.assert_array_equal(ours, raster_morphology(disk))
    assert ours.sum() < foreground_mask(tokens, threshold=10.0, morphology="grid").sum()


def test_raster_morphology_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((7, 9)) < 0.3
        col = mask.astype(np.uint8).reshape(-1, 1)
        import cv2

        k = np.ones((3, 3), np.uint8)
        got = cv2.morphologyEx(cv2.dilate(col, k), cv2.MORPH_CLOSE, k).reshape(mask.shape).astype(bool)
        np.testing.assert_array_equal(got, raster_morphology(mask))


class BrightnessEmbedder:
    """4x4 cells -> [60*mean, 60*std, ...]: the first principal component separates bright from dark."""

    patch_size = 4

    def __call__(self, pixels):
        g = pixels.mean(1, keepdim=True)
        m = F.avg_pool2d(g, 4)
        s = (F.avg_pool2d(g * g, 4) - m * m).clamp_min(0).sqrt()
        return torch.cat([60 * m, 60 * s, 20 * m * s, 5 * (1 - m)], 1).permute(0, 2, 3, 1)


def part(rng, defect_at=None):
    """A bright disk (the part) on a dark background, optionally a checkerboard defect at (y, x)."""
    yy, xx = np.mgrid[:48, :48]
    img = rng.normal(0.1, 0.01, (48, 48))
    disk = (yy - 23.5) ** 2 + (xx - 23.5) ** 2 <= 14**2
    img[disk] = rng.normal(0.8, 0.01, disk.sum())
    if defect_at:
        y, x = defect_at
        img[y : y + 8, x : x + 8] += (np.add.outer(np.arange(8), np.arange(8)) % 2) * 0.3 - 0.15
    return (np.clip(img, 0, 1)[..., None].repeat(3, 2) * 255).astype(np.uint8)


def test_masking_silences_background_defects_only():
    rng = np.random.default_rng(0)
    train = [part(rng) for _ in range(3)]
    test = [part(rng), part(rng, (0, 0)), part(rng, (20, 20))]  # good, background defect, part defect
    preds = {}
    for masking in (False, True):
        det = create_detector("anomalydino", embedder=BrightnessEmbedder(), image_size=48, blur_sigma=0, masking=masking)
        preds[masking] = det.fit(train).predict(test)
    plain, masked = preds[False], preds[True]
    assert plain.scores[1] > 10 * plain.scores[0] and plain.maps[1][:8, :8].max() > 0.01
    assert masked.maps[1][:8, :8].max() == 0.0  # background patches score 0 (reference code)
    assert masked.scores[1] < 0.01 * plain.scores[1]
    assert masked.scores[2] == pytest.approx(plain.scores[2])  # a defect on the part is kept
    np.testing.assert_array_equal(masked.maps[2][20:28, 20:28], plain.maps[2][20:28, 20:28])


def test_mask_reference_drops_background_patches_from_the_bank():
    rng = np.random.default_rng(0)
    train = [part(rng) for _ in range(2)]
    kw = dict(embedder=BrightnessEmbedder(), image_size=48, masking=True)
    all_patches = create_detector("anomalydino", **kw).fit(train).n_train_patches_
    fg = foreground_mask(BrightnessEmbedder()(torch.from_numpy(train[0]).permute(2, 0, 1)[None].float() / 255)[0].numpy())
    det = create_detector("anomalydino", mask_reference=True, **kw).fit(train)
    assert all_patches == 2 * 144 and det.n_train_patches_ < all_patches
    assert abs(det.n_train_patches_ - 2 * fg.sum()) <= 4  # two near-identical parts


# ------------------------------------------------------------------------------ params and configs
@pytest.mark.parametrize("params, message", [
    ({"backbone": "mobilenet_v2"}, "torchvision:mobilenet_v2"),
    ({"backbone": "dinov2_vits16"}, "dinov2_vits14"),
    ({"backbone": "torchvision:mobilenet_v2"}, "layers must be given"),
    ({"layers": ["blocks.3"]}, "layers must be given"),
    ({"mask_reference": True}, "mask_reference needs masking"),
    ({"coreset": {"ratio": 0}}, "coreset.ratio"),
])
def test_bad_params_fail_validation_with_the_field(params, message):
    cfg = {"name": "x", "dataset": {"type": "mvtec_ad", "root": "d", "category": "all"},
           "detector": {"name": "anomalydino", "params": params}}
    with pytest.raises(ConfigError, match="detector.params") as err:
        validate_config(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*anomalydino*.yaml")) + ["visa_openclip_patchknn.yaml"])
def test_shipped_configs_validate(config):
    res = run("validate", REPO / "configs" / config)
    assert res.exit_code == 0, res.output


def test_importing_the_package_does_not_import_optional_models():
    code = ("import sys, pyimgano_core, pyimgano_core.config, pyimgano_cli.app, pyimgano_core.features.vit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'open_clip', 'faiss')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


MISSING = [("dinov2_vits14", "timm", "dino"), ("openclip:ViT-B-32", "open_clip", "clip")]


def _eval_without(tmp_path, monkeypatch, backbone, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    root = make_mvtec_tree(tmp_path / "d", n_train=2, n_test_good=1, defects={"scratch": 1})
    cfg = write_config(tmp_path / "c.yaml", root, "anomalydino", {"backbone": backbone, "weights": None})
    return run("eval", cfg, "--out", tmp_path / "o", "-q")


@pytest.mark.parametrize("backbone, module, extra", MISSING)
def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch, backbone, module, extra):
    res = _eval_without(tmp_path, monkeypatch, backbone, module)
    assert res.exit_code == 5 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and f"'{module}' is required" in res.output
    with pytest.raises(OptionalDependencyError, match=re.escape(f'pip install "pyimgano[{extra}]"')):
        create_detector("anomalydino", backbone=backbone, weights=None).fit(images(1, 0))


def test_cli_error_shows_the_extra_verbatim(tmp_path, monkeypatch):
    res = _eval_without(tmp_path, monkeypatch, "dinov2_vits14", "timm")
    assert 'pip install "pyimgano[dino]"' in res.output


# ------------------------------------------------------------------------------ real ViTs (random weights)
def _eval_end_to_end(tmp_path, detector, params, size):
    root = make_mvtec_tree(tmp_path / "d", n_train=3, n_test_good=2, defects={"scratch": 2}, size=(size, size))
    cfg = write_config(tmp_path / "c.yaml", root, detector, params, output={"save_maps": True})
    res = run("eval", cfg, "--out", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o/t/widget/report.json").read_text())
    assert report["counts"]["test"] == 4 and report["counts"]["pixel_evaluated"] == 4
    assert report["metrics"]["image_auroc"] is not None and report["metrics"]["aupro"] is not None
    maps = sorted((tmp_path / "o/t/widget/maps").rglob("*_map.npy"))
    assert len(maps) == 4
    for m in maps:
        amap = np.load(m)
        assert amap.shape == (size, size) and np.isfinite(amap).all()
    return report


def test_dinov2_vits14_random_weights_end_to_end(tmp_path):
    pytest.importorskip("timm", reason="timm not installed (extra 'dino')")
    report = _eval_end_to_end(tmp_path, "anomalydino", {"backbone": "dinov2_vits14", "weights": None, "image_size": 56,
                                                         "masking": True}, 56)
    assert report["protocol"]["model_input"] == {"mode": "shorter_side", "size": 56, "crop": None, "multiple": 14}
    assert report["protocol"]["evaluated_fraction_of_image"] == 1.0


def test_openclip_vitb32_random_weights_end_to_end(tmp_path):
    pytest.importorskip("open_clip", reason="open_clip_torch not installed (extra 'clip')")
    report = _eval_end_to_end(tmp_path, "openclip_patchknn", {"backbone": "openclip:ViT-B-32", "weights": None,
                                                               "image_size": 64}, 64)
    assert report["protocol"]["model_input"]["multiple"] == 32


def test_dinov2_embedder_shapes(tmp_path):
    pytest.importorskip("timm", reason="timm not installed (extra 'dino')")
    from pyimgano_core.features.vit import build_embedder

    emb = build_embedder("dinov2_vits14", None)
    assert emb.patch_size == 14 and emb(torch.rand(2, 3, 42, 70)).shape == (2, 3, 5, 384)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        emb(torch.rand(1, 3, 40, 42))


def test_timm_weights_from_a_local_checkpoint(tmp_path):
    pytest.importorskip("timm", reason="timm not installed (extra 'dino')")
    from pyimgano_core.features.vit import build_embedder

    name = "timm:vit_tiny_patch16_224"  # same code path as DINOv2, a quarter of the size
    emb = build_embedder(name, None)
    x = torch.rand(1, 3, 32, 48)
    # perturbed random weights saved to disk come back through weights=<path>
    state = emb.model.state_dict()
    state["norm.bias"] = state["norm.bias"] + 1.0
    state["mask_token"] = torch.zeros(1, 192)  # as DINOv2's own release files: converted by timm on load
    torch.save(state, tmp_path / "vit.pth")
    loaded = build_embedder(name, str(tmp_path / "vit.pth"))
    np.testing.assert_allclose(loaded(x).numpy(), emb(x).numpy() + 1.0, atol=1e-5)
    with pytest.raises(ModelError, match="not found"):
        build_embedder(name, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="vit_small_patch14_dinov2"):
        build_embedder("timm:vit_smal_patch14_dinov2", None)
