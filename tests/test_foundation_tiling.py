"""Tiling for the foundation-model detectors (AnomalyDINO, OpenCLIP patch kNN) through the shared
patch-kNN core (detectors/tiling.py): stitched maps against a plain per-tile reference, rotations
and per-tile banks of L2-normalised tokens, bad input, export-onnx refusal, and a DINOv2 ViT-S/14
with random weights end to end. Injected embedders except the last test (no weights needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyimgano_core.config import validate_config
from pyimgano_core.detectors.anomalydino import ROTATION_ANGLES, AnomalyDINO
from pyimgano_core.detectors.patchknn.tiling import tile_starts
from pyimgano_core.errors import ConfigError, ModelError
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder, run_cli, write_config


class TokenEmbedder(PixelEmbedder):
    """PixelEmbedder that states a ViT-like patch size (its 4x4 cells), as the real embedders do."""

    patch_size = 4


class RandomConvEmbedder(torch.nn.Module):
    """A random-weight 'ViT stem': a seeded 8x8 stride-8 convolution, patch size 8."""

    patch_size = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(pixels)).permute(0, 2, 3, 1)


def images(n: int, seed: int, hw=(72, 104)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(80, 120, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def per_tile_reference(untiled, image: np.ndarray, tile: int, overlap: float) -> np.ndarray:
    """Each tile scored as its own image by an untiled detector (no blur), overlaps averaged."""
    h, w = image.shape[:2]
    acc, cnt = np.zeros((h, w)), np.zeros((h, w))
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            acc[y : y + tile, x : x + tile] += untiled.predict([image[y : y + tile, x : x + tile]]).maps[0]
            cnt[y : y + tile, x : x + tile] += 1
    return acc / cnt


@pytest.mark.parametrize("embedder", [TokenEmbedder, RandomConvEmbedder])
def test_tiled_anomalydino_equals_scoring_each_tile_alone(embedder):
    train, (test,) = images(3, 0), images(1, 1)
    test[30:50, 40:70] = 230  # a defect across tile seams
    tile, overlap = 48, 0.25
    common = dict(coreset={"ratio": 1.0}, blur_sigma=0.0, batch_size=4, aggregation="max")
    tiled = AnomalyDINO(embedder=embedder(), **common, tiling={"tile": tile, "overlap": overlap}).fit(train)
    cut = [im[y : y + tile, x : x + tile] for im in train for y in tile_starts(72, tile, overlap)
           for x in tile_starts(104, tile, overlap)]
    untiled = AnomalyDINO(embedder=embedder(), **common, image_size=tile, resize_mode="squash").fit(cut)
    # the same L2-normalised tokens in the bank (cosine memory), in the same order
    np.testing.assert_allclose(tiled.memory_, untiled.memory_, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(tiled.memory_, axis=1), 1.0, atol=1e-5)
    pred = tiled.predict([test])
    ref = per_tile_reference(untiled, test, tile, overlap)
    assert pred.maps[0].shape == (72, 104)
    np.testing.assert_allclose(pred.maps[0], ref, rtol=1e-4, atol=1e-6)
    assert pred.scores[0] == pytest.approx(ref.max(), rel=1e-5)
    # AnomalyDINO's own rule (top-1% mean), over the stitched map; the blur only changes the map
    top = AnomalyDINO(embedder=embedder(), coreset={"ratio": 1.0}, tiling={"tile": tile, "overlap": overlap}).fit(train)
    got = top.predict([test])
    assert got.scores[0] == pytest.approx(np.sort(ref.ravel())[-int(ref.size * 0.01):].mean(), rel=1e-4)
    assert got.maps[0].max() < ref.max()
    assert top.protocol()["input_rule"]["rule"] == "tiles" and top.geometry.describe()["size"] == tile


def test_rotations_and_per_tile_banks_of_normalised_tokens(tmp_path):
    train = images(2, 2, hw=(64, 96))
    kw = dict(embedder=TokenEmbedder(), coreset={"ratio": 1.0}, tiling={"tile": 32, "overlap": 0.0, "bank": "per_tile"})
    det = AnomalyDINO(**kw).fit(train)
    assert det.tile_grid_ == (2, 3) and list(det.tile_offsets_) == [128 * k for k in range(7)]  # 2 images x 8x8 patches
    rot = AnomalyDINO(**kw, rotation=True).fit(train)  # each image under 8 angles, each cut into the same 2x3 tiles
    assert list(rot.tile_offsets_) == [128 * len(ROTATION_ANGLES) * k for k in range(7)]
    np.testing.assert_allclose(np.linalg.norm(rot.memory_, axis=1), 1.0, atol=1e-5)
    # a training tile scores ~0 against its own position's bank
    assert det.predict([train[0]]).scores[0] == pytest.approx(0.0, abs=1e-5)
    # saved and loaded: the same scores and maps (per-tile offsets restored)
    test = images(1, 3, hw=(64, 96))
    before = det.predict(test)
    Model(det).save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m", embedder=TokenEmbedder()).detector
    after = loaded.predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert loaded.tile_grid_ == (2, 3)


def _config(params: dict) -> dict:
    return {"name": "t", "dataset": {"type": "mvtec_ad", "root": ".", "category": "bottle"},
            "detector": {"name": "anomalydino", "params": {"weights": None, **params}}}


@pytest.mark.parametrize("params,message", [
    ({"tiling": {"tile": 448}, "masking": True}, "masking does not apply with tiling"),
    ({"tiling": {"tile": 448}, "masking": "reference"}, "masking does not apply with tiling"),
    ({"tiling": {"tile": 448}, "patch_multiple": 14}, "patch_multiple does not apply with tiling"),
    ({"tiling": {"tile": 448, "scale": 0.5}}, "blur_at: original does not apply with tiling.scale != 1"),
    ({"tiling": {"tile": 448}, "image_size": 448}, "image_size, crop and resize_mode do not apply with tiling"),
    ({"tiling": {"tile": 448}, "aggregation": "topk_mean", "topk": 5}, "topk counts the patches of one model input"),
    ({"tiling": {"tile": 448, "bank": "per_tile"}, "knn": {"kind": "hnsw"}}, "per_tile searches each tile position's bank"),
    ({"tiling": {"tile": 448, "overlap": 1.0}}, "detector.params.tiling.overlap"),
])
def test_bad_tiling_settings_of_anomalydino_are_config_errors(params, message):
    with pytest.raises(ConfigError, match="detector.params") as err:
        validate_config(_config(params))
    assert message in str(err.value)
    validate_config(_config({"tiling": {"tile": 448, "scale": 0.5}, "blur_at": "input"}))  # the stated way out


def test_a_tile_that_is_not_a_multiple_of_the_patch_size_fails_before_the_fit():
    calls = []

    class Counting(TokenEmbedder):
        def __call__(self, pixels):
            calls.append(1)
            return super().__call__(pixels)

    with pytest.raises(ConfigError, match=r"detector\.params\.tiling\.tile=50 is not a multiple of the backbone's patch size 4"):
        AnomalyDINO(embedder=Counting(), tiling={"tile": 50}).fit(images(1, 0))
    assert not calls


def test_export_onnx_refuses_a_tiled_anomalydino_in_one_line(tmp_path):
    from pyimgano_core.deploy.onnx_export import check_exportable

    det = AnomalyDINO(embedder=TokenEmbedder(), coreset={"ratio": 1.0}, tiling={"tile": 32}).fit(images(1, 0))
    with pytest.raises(ModelError, match="cannot export to ONNX: tiling") as err:
        check_exportable(Model(det), tmp_path)
    assert "\n" not in str(err.value)


def test_dinov2_random_weights_tiled_end_to_end(tmp_path):
    pytest.importorskip("timm", reason="timm not installed (extra 'dino')")
    from tests.synth import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "d", n_train=2, n_test_good=2, defects={"scratch": 2}, size=(70, 98))
    params = {"backbone": "dinov2_vits14", "weights": None, "tiling": {"tile": 56, "overlap": 0.25}}
    cfg = write_config(tmp_path / "c.yaml", root, "anomalydino", params)
    res = run_cli("eval", cfg, "--out", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o/t/widget/report.json").read_text())
    assert report["protocol"]["input_rule"]["rule"] == "tiles" and report["protocol"]["input_rule"]["tile"] == 56
    assert report["protocol"]["evaluated_fraction_of_image"] == 1.0 and report["metrics"]["aupro"] is not None
    bad = write_config(tmp_path / "bad.yaml", root, "anomalydino", {**params, "tiling": {"tile": 60}})
    res = run_cli("fit", bad, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "tiling.tile=60 is not a multiple of the backbone's patch size 14" in res.output
    assert "Traceback" not in res.output
