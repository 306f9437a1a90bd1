"""``image_size: auto`` (detectors/inputs.py, features/geometry.auto_input_hw): reproducible, saved
with the model, in the report's protocol; a budget below a 3x3 patch grid is a config error."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyimgano_core.config import validate_config
from pyimgano_core.detectors.patchcore import PatchCore
from pyimgano_core.errors import ConfigError
from pyimgano_core.features.geometry import auto_input_hw
from pyimgano_core.model import Model


class TwoTapEmbedder:
    """Taps at strides 4 and 8 (like a CNN's): features on the stride-4 grid, [B, H/4, W/4, 6]."""

    strides = [4, 8]
    calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        TwoTapEmbedder.calls += 1
        fine = F.avg_pool2d(pixels, 4)
        coarse = F.interpolate(F.avg_pool2d(pixels, 8), size=fine.shape[-2:], mode="nearest")
        return torch.cat([fine, coarse], 1).permute(0, 2, 3, 1).contiguous()


def test_auto_size_follows_the_median_aspect_and_the_budget():
    sizes = [(100, 250), (120, 300), (90, 400), (500, 100)]  # w/h: 2.5, 2.5, 4.44, 0.2 -> median 2.5
    (h, w), aspect = auto_input_hw(sizes, 224 * 224, 16)
    assert aspect == pytest.approx(2.5)
    assert h % 16 == 0 and w % 16 == 0
    # nearest multiples of sqrt(50176 / 2.5) = 141.7 and 354.2
    assert (h, w) == (144, 352)
    assert auto_input_hw(sizes[::-1], 224 * 224, 16) == ((h, w), aspect)  # order does not matter
    assert auto_input_hw([(900, 900)] * 3, 256 * 256, 32)[0] == (256, 256)
    assert auto_input_hw([(10, 1000)], 100, 16)[0] == (16, 96)  # h = sqrt(100 / 100) = 1: at least one multiple


def _images(rng, n, hw):
    return [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def test_auto_size_is_resolved_at_fit_reproducible_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    train = _images(rng, 3, (60, 150)) + _images(rng, 2, (80, 200))  # all w/h = 2.5
    det = PatchCore(embedder=TwoTapEmbedder(), image_size="auto", pixel_budget=64 * 160, coreset={"ratio": 0.5}).fit(train)
    assert det.image_size_ == (64, 160)
    assert det.geometry.input_hw((60, 150)) == (64, 160)
    record = det.protocol()["input_rule"]
    assert record["resolved_hw"] == [64, 160] and record["median_aspect_w_over_h"] == pytest.approx(2.5)
    assert record["patch_grid"] == [16, 40] and record["multiple_of"] == 8 and record["pixel_budget"] == 64 * 160
    again = PatchCore(embedder=TwoTapEmbedder(), image_size="auto", pixel_budget=64 * 160, coreset={"ratio": 0.5}).fit(train[::-1])
    assert again.image_size_ == det.image_size_
    test = _images(rng, 2, (70, 120))
    pred = det.predict(test)
    assert pred.maps.shape == (2, 64, 160)
    Model(det).save(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["params"]["image_size"] == "auto" and doc["state"]["image_size_"] == [64, 160]
    assert doc["state"]["auto_input_"]["resolved_hw"] == [64, 160]
    loaded = Model.load(tmp_path / "m", embedder=TwoTapEmbedder()).detector
    assert loaded.image_size_ == (64, 160) and loaded.protocol()["input_rule"] == record
    after = loaded.predict(test)
    np.testing.assert_array_equal(pred.scores, after.scores)
    np.testing.assert_array_equal(pred.maps, after.maps)
    # a model.json without the resolved size is refused in one line
    del doc["state"]["image_size_"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    from pyimgano_core.errors import ModelError

    with pytest.raises(ModelError, match="image_size: auto but no resolved size"):
        Model.load(tmp_path / "m", embedder=TwoTapEmbedder())


def test_budget_below_a_3x3_grid_is_a_config_error_before_any_feature():
    TwoTapEmbedder.calls = 0
    rng = np.random.default_rng(1)
    det = PatchCore(embedder=TwoTapEmbedder(), image_size="auto", pixel_budget=8 * 8)
    with pytest.raises(ConfigError, match=r"detector\.params\.pixel_budget=64 gives a 8x8 model input, a 2x2 patch grid"):
        det.fit(_images(rng, 2, (50, 50)))
    assert TwoTapEmbedder.calls == 0
    ok = PatchCore(embedder=TwoTapEmbedder(), image_size="auto", pixel_budget=12 * 12, coreset={"ratio": 1.0}).fit(_images(rng, 2, (50, 50)))
    assert ok.image_size_ == (16, 16)  # 12 rounds to 16 (multiple of 8): a 4x4 grid


def test_embedder_without_strides_is_refused():
    with pytest.raises(ConfigError, match="needs the backbone's strides"):
        PatchCore(embedder=lambda x: F.avg_pool2d(x, 4).permute(0, 2, 3, 1), image_size="auto").fit(
            [np.zeros((32, 32, 3), np.uint8)])


def test_real_backbone_strides_are_probed():
    det = PatchCore(backbone="resnet18", layers=["layer1", "layer2"], weights=None, image_size="auto",
                    pixel_budget=64 * 64, coreset={"ratio": 1.0}, pretrain_embed_dim=16, target_embed_dim=16)
    det.fit([np.zeros((40, 80, 3), np.uint8), np.full((40, 80, 3), 9, np.uint8)])
    assert det.image_size_ == (48, 88)  # sqrt(4096 / 2) = 45.3 -> 48, 90.5 -> 88 (nearest multiples of layer2 stride 8)
    assert det.protocol()["input_rule"]["patch_grid"] == [12, 22]  # at layer1's stride 4


def _config(params: dict) -> dict:
    return {"name": "t", "dataset": {"type": "mvtec_ad", "root": ".", "category": "bottle"},
            "detector": {"name": "patchcore", "params": params}}


def test_auto_config_rules():
    cfg = validate_config(_config({"image_size": "auto", "pixel_budget": 300 * 300}))
    assert cfg.detector.params["resize_mode"] == "squash" and cfg.detector.params["crop"] is None
    assert validate_config(cfg.model_dump(mode="json")).detector.params == cfg.detector.params  # the dump round-trips
    with pytest.raises(ConfigError, match="image_size: auto is a fixed"):
        validate_config(_config({"image_size": "auto", "crop": 224}))
    with pytest.raises(ConfigError, match="pixel_budget only applies with image_size: auto"):
        validate_config(_config({"image_size": 224, "pixel_budget": 1000}))
    with pytest.raises(ConfigError, match=r"detector\.params\.image_size"):
        validate_config(_config({"image_size": "autom"}))
    assert math.isclose(PatchCore.Params.model_fields["pixel_budget"].default, 224 * 224)


def test_auto_sized_model_exports_to_onnx_with_parity(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pyimgano_core.calibration import fit_thresholds
    from pyimgano_core.deploy.onnx_export import export_onnx
    from pyimgano_core.infer import load_model
    from tests.synth import normal_image, write_image

    rng = np.random.default_rng(0)
    paths = [write_image(tmp_path / f"{i}.png", normal_image(rng, (40, 90 + 4 * i))) for i in range(6)]
    det = PatchCore(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size="auto",
                    pixel_budget=48 * 96, coreset={"ratio": 0.5}, pretrain_embed_dim=40, target_embed_dim=32).fit(paths[:3])
    assert det.image_size_ == (48, 104)  # median w/h 94/40 = 2.35: sqrt(4608 / 2.35) = 44.3 -> 48, 104.1 -> 104 (stride 8)
    pred = det.predict(paths[3:])
    model = Model(det, meta={"holdout": [str(p) for p in paths[3:]]})
    model.thresholds = fit_thresholds(pred.scores, list(pred.maps), 0.9, 0.99)
    info = export_onnx(model.save(tmp_path / "m"))
    assert info["input_hw"] == [48, 104] and list(info["geometry"]["size"]) == [48, 104]
    assert info["parity"]["max_score_rel_diff"] <= 1e-4 and info["parity"]["max_map_rel_diff"] <= 1e-4
    probe = write_image(tmp_path / "probe.png", normal_image(np.random.default_rng(5), (50, 70)))
    a, b = load_model(tmp_path / "m").predict(probe), load_model(tmp_path / "m", runtime="onnx").predict(probe)
    assert abs(a.score - b.score) <= 1e-4 * abs(a.score)
