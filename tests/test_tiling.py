"""Tiling (detectors/tiling.py): grid coverage, stitching against a plain per-tile reference,
per-tile banks, save/load, bad input. Injected embedders only (no weights): fast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyimgano_core.config import validate_config
from pyimgano_core.detectors.patchcore import PatchCore
from pyimgano_core.detectors.softpatch import SoftPatch
from pyimgano_core.detectors.patchknn.tiling import Tiling, plan_grid, tile_starts
from pyimgano_core.errors import ConfigError, DataError, ModelError
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder


class MeanEmbedder:
    """[B, 3, H, W] -> [B, H/4, W/4, 3]: each 4x4 cell's mean colour (a score is a colour distance)."""

    strides = [4]
    calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        MeanEmbedder.calls += 1
        return F.avg_pool2d(pixels, 4).permute(0, 2, 3, 1).contiguous()


def flat(value: int, h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


@pytest.mark.parametrize("length,tile,overlap", [(900, 448, 0.25), (901, 448, 0.25), (517, 100, 0.3), (64, 64, 0.5),
                                                 (97, 32, 0.0), (1000, 17, 0.9), (448, 447, 0.25)])
def test_tile_starts_cover_every_pixel_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1
    gaps = np.diff(starts)
    assert np.all(gaps >= 1) and np.all(tile - gaps >= math.ceil(tile * overlap))
    # the fewest such tiles: one fewer could not keep the overlap
    if len(starts) > 1:
        assert (len(starts) - 2) * (tile - math.ceil(tile * overlap)) < length - tile


def test_grid_of_a_non_multiple_image_covers_every_pixel_once_or_more():
    grid = plan_grid((901, 517), Tiling(tile=256, overlap=0.25))
    cover = grid.coverage()
    assert cover.shape == (901, 517) and cover.min() >= 1
    assert grid.shape == (5, 3)  # 1 + ceil((901 - 256) / 192), 1 + ceil((517 - 256) / 192)
    scaled = plan_grid((900, 900), Tiling(tile=224, overlap=0.25, scale=0.5))
    assert scaled.hw == (450, 450) and scaled.coverage().min() >= 1


def test_constant_scores_stitch_to_a_constant_map():
    det = PatchCore(embedder=MeanEmbedder(), coreset={"ratio": 1.0}, distance="euclidean", tiling={"tile": 64, "overlap": 0.3})
    det.fit([flat(50, 150, 97), flat(50, 130, 200)])
    pred = det.predict([flat(150, 150, 97), flat(150, 211, 173)])
    expected = math.sqrt(3) * 100 / 255  # the distance of grey 150 to grey 50, over the 3 channels
    for amap, hw, score in zip(pred.maps, [(150, 97), (211, 173)], pred.scores):
        assert amap.shape == hw
        np.testing.assert_allclose(amap, expected, rtol=1e-5)
        assert score == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(pred.boxes[1], [0, 0, 211, 173])


def _reference_stitch(det_untiled, image, tile, overlap):
    """Plain reference: score each tile as its own image (no tiling, no blur), average overlaps."""
    h, w = image.shape[:2]
    acc, cnt = np.zeros((h, w)), np.zeros((h, w))
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            m = det_untiled.predict([image[y : y + tile, x : x + tile]]).maps[0]
            acc[y : y + tile, x : x + tile] += m
            cnt[y : y + tile, x : x + tile] += 1
    return acc / cnt


def test_stitched_map_and_score_equal_a_per_tile_reference():
    rng = np.random.default_rng(0)
    train = [rng.integers(90, 110, (120, 150, 3), dtype=np.uint8) for _ in range(3)]
    test = rng.integers(90, 110, (120, 150, 3), dtype=np.uint8)
    test[40:60, 70:95] = 230  # a defect across a tile seam
    common = dict(embedder=PixelEmbedder(), coreset={"ratio": 1.0}, blur_sigma=0.0, batch_size=3)
    tiled = PatchCore(**common, tiling={"tile": 64, "overlap": 0.25}).fit(train)
    untiled = PatchCore(**common, image_size=64, crop=None, resize_mode="squash")
    untiled.fit([im[y : y + 64, x : x + 64] for im in train for y in tile_starts(120, 64, 0.25) for x in tile_starts(150, 64, 0.25)])
    np.testing.assert_allclose(np.sort(tiled.memory_, axis=0), np.sort(untiled.memory_, axis=0), atol=1e-6)
    pred = tiled.predict([test])
    ref = _reference_stitch(untiled, test, 64, 0.25)
    np.testing.assert_allclose(pred.maps[0], ref, rtol=1e-4, atol=1e-6)
    assert pred.scores[0] == pytest.approx(ref.max(), rel=1e-5)  # aggregation max over the stitched map
    assert np.unravel_index(pred.maps[0].argmax(), ref.shape)[0] in range(36, 64)
    # blurred output map: the same stitched map, then the blur
    blurred = PatchCore(**{**common, "blur_sigma": 4.0}, tiling={"tile": 64, "overlap": 0.25}).fit(train).predict([test])
    assert blurred.scores[0] == pytest.approx(pred.scores[0], rel=1e-6)  # the score is taken before the blur
    assert blurred.maps[0].max() < pred.maps[0].max()
    on_map = PatchCore(**{**common, "blur_sigma": 4.0, "aggregation": "blurred_max"}, tiling={"tile": 64, "overlap": 0.25})
    on_map = on_map.fit(train).predict([test])
    assert on_map.scores[0] == pytest.approx(float(blurred.maps[0].max()), rel=1e-6)  # blurred_max: after the blur
    top = PatchCore(**common, aggregation="topk_mean", topk_ratio=0.01, tiling={"tile": 64, "overlap": 0.25}).fit(train)
    assert top.predict([test]).scores[0] == pytest.approx(np.sort(ref.ravel())[-int(ref.size * 0.01):].mean(), rel=1e-4)


def test_per_tile_banks_only_compare_a_tile_with_its_own_position():
    left_red = np.zeros((64, 128, 3), np.uint8)
    left_red[:, :64, 0] = 200
    left_red[:, 64:, 2] = 200
    swapped = left_red[:, ::-1].copy()  # red on the right: each colour is normal, but at the wrong tile
    common = dict(embedder=MeanEmbedder(), coreset={"ratio": 1.0}, distance="euclidean")
    shared = PatchCore(**common, tiling={"tile": 64, "overlap": 0.0, "bank": "shared"}).fit([left_red, left_red])
    per_tile = PatchCore(**common, tiling={"tile": 64, "overlap": 0.0, "bank": "per_tile"}).fit([left_red, left_red])
    assert per_tile.tile_grid_ == (1, 2) and list(per_tile.tile_offsets_) == [0, 512, 1024]
    assert shared.predict([swapped]).scores[0] == pytest.approx(0.0, abs=1e-5)
    assert per_tile.predict([swapped]).scores[0] == pytest.approx(math.sqrt(2) * 200 / 255, rel=1e-5)
    assert per_tile.predict([left_red]).scores[0] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(DataError, match="per_tile"):  # a test image with another tile grid fails alone
        per_tile.predict([np.zeros((64, 200, 3), np.uint8)])


def test_model_folder_round_trip_of_both_banks(tmp_path):
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 255, (100, 140, 3), dtype=np.uint8) for _ in range(2)]
    test = [rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)]
    for bank in ("shared", "per_tile"):
        det = PatchCore(embedder=PixelEmbedder(), coreset={"ratio": 0.5}, tiling={"tile": 48, "overlap": 0.25, "bank": bank}).fit(train)
        before = det.predict(test)
        Model(det).save(tmp_path / bank)
        loaded = Model.load(tmp_path / bank, embedder=PixelEmbedder()).detector
        after = loaded.predict(test)
        np.testing.assert_array_equal(before.scores, after.scores)
        np.testing.assert_array_equal(before.maps, after.maps)
        assert loaded.protocol()["input_rule"]["tile"] == 48 and loaded.protocol()["input_rule"]["bank"] == bank
    arrays = dict(np.load(tmp_path / "per_tile" / "arrays.npz"))
    arrays["tile_offsets_"] = arrays["tile_offsets_"][:-1]
    np.savez(tmp_path / "per_tile" / "arrays.npz", **arrays)
    with pytest.raises(ModelError, match="tile_offsets_"):
        Model.load(tmp_path / "per_tile", embedder=PixelEmbedder())


def test_tile_larger_than_a_training_image_is_a_config_error_before_any_feature():
    MeanEmbedder.calls = 0
    det = PatchCore(embedder=MeanEmbedder(), coreset={"ratio": 1.0}, tiling={"tile": 128})
    with pytest.raises(ConfigError, match=r"detector\.params\.tiling\.tile=128 is larger than image #1 \(200x100 px\)"):
        det.fit([flat(0, 300, 300), flat(0, 100, 200)])
    assert MeanEmbedder.calls == 0
    with pytest.raises(ConfigError, match=r"tiling\.scale=0\.5"):
        PatchCore(embedder=MeanEmbedder(), tiling={"tile": 128, "scale": 0.5}).fit([flat(0, 200, 200)])
    assert MeanEmbedder.calls == 0
    det = PatchCore(embedder=MeanEmbedder(), coreset={"ratio": 1.0}, tiling={"tile": 64}).fit([flat(0, 100, 100)])
    with pytest.raises(DataError, match=r"tiling\.tile=64 is larger than image #1") as err:  # at predict: that image alone
        det.predict([flat(0, 100, 100), flat(0, 50, 300)])
    assert err.value.image_index == 1


def test_per_tile_bank_needs_one_grid_for_all_training_images():
    with pytest.raises(DataError, match="per_tile needs one tile grid"):
        PatchCore(embedder=MeanEmbedder(), tiling={"tile": 64, "bank": "per_tile"}).fit([flat(0, 64, 64), flat(0, 64, 130)])


def _config(params: dict) -> dict:
    return {"name": "t", "dataset": {"type": "mvtec_ad", "root": ".", "category": "bottle"},
            "detector": {"name": "patchcore", "params": params}}


@pytest.mark.parametrize("params,field", [
    ({"tiling": {"tile": 448, "overlap": 1.0}}, "detector.params.tiling.overlap"),
    ({"tiling": {"tile": 448, "overlap": -0.1}}, "detector.params.tiling.overlap"),
    ({"tiling": {"tile": 8}}, "detector.params.tiling.tile"),
    ({"tiling": {"tile": 448, "overlap": 0.2, "stride": 3}}, "detector.params.tiling.stride: unknown key"),
    ({"tiling": {"tile": 448}, "image_size": 224}, "image_size, crop and resize_mode do not apply with tiling"),
    ({"tiling": {"tile": 448}, "reweight_neighbors": 9}, "reweight_neighbors does not apply with tiling"),
    ({"tiling": {"tile": 448, "bank": "per_tile"}, "knn": {"kind": "hnsw"}}, "per_tile searches each tile position's bank exactly"),
    ({"tiling": {"tile": 448}, "aggregation": "topk_mean", "topk": 5}, "topk counts the patches of one model input"),
])
def test_bad_tiling_settings_are_config_errors_naming_the_field(params, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        validate_config(_config(params))


def test_softpatch_tiles_into_one_shared_bank_only():
    cfg = validate_config({**_config({"tiling": {"tile": 64}}), "detector": {"name": "softpatch", "params": {"tiling": {"tile": 64}}}})
    assert cfg.detector.params["tiling"]["bank"] == "shared"
    with pytest.raises(ConfigError, match="per_tile is not supported by softpatch"):
        validate_config({**_config({}), "detector": {"name": "softpatch", "params": {"tiling": {"tile": 64, "bank": "per_tile"}}}})
    rng = np.random.default_rng(2)
    det = SoftPatch(embedder=PixelEmbedder(), coreset={"ratio": 0.5}, tiling={"tile": 32, "overlap": 0.0})
    det.fit([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)])
    assert det.train_outlier_scores_.shape == (8, 8, 8)  # 2 images x 4 tiles, each an 8x8 patch grid
    assert det.predict([rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)]).maps[0].shape == (64, 96)


def test_export_onnx_refuses_tiling_in_one_line(tmp_path):
    from pyimgano_core.deploy.onnx_export import check_exportable

    det = PatchCore(embedder=MeanEmbedder(), coreset={"ratio": 1.0}, tiling={"tile": 32}).fit([flat(0, 64, 64)])
    with pytest.raises(ModelError, match="cannot export to ONNX: tiling") as err:
        check_exportable(Model(det), tmp_path)
    assert "\n" not in str(err.value)


def test_eval_with_tiles_and_with_image_size_auto_writes_the_rule_into_the_protocol(tmp_path):
    import json

    from typer.testing import CliRunner

    from pyimgano_cli.app import app
    from tests.helpers import TINY_CNN, write_config
    from tests.synth import make_mvtec_tree

    tree = make_mvtec_tree(tmp_path / "data", n_train=4, n_test_good=2, defects={"scratch": 2}, size=(48, 80))
    base = {k: v for k, v in TINY_CNN.items() if k not in ("image_size", "crop")}
    runs = {"tiles": {**base, "tiling": {"tile": 64, "overlap": 0.25, "scale": 1.5}},
            "auto": {**base, "image_size": "auto", "pixel_budget": 48 * 80}}
    for name, params in runs.items():
        cfg = write_config(tmp_path / f"{name}.yaml", tree, params=params)
        res = CliRunner().invoke(app, ["eval", str(cfg), "--out", str(tmp_path / name), "--json"])
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / name / "t/widget/report.json").read_text())
        assert report["metrics"]["pixel_auroc"] >= 0.8 and report["protocol"]["evaluated_fraction_of_image"] == 1.0
        runs[name] = report["protocol"]["input_rule"]
    assert runs["tiles"]["rule"] == "tiles" and runs["tiles"]["scale"] == 1.5 and runs["tiles"]["bank"] == "shared"
    assert runs["auto"]["rule"] == "image_size auto" and runs["auto"]["resolved_hw"] == [48, 80]
    bad = write_config(tmp_path / "bad.yaml", tree, params={**base, "tiling": {"tile": 100}})
    res = CliRunner().invoke(app, ["fit", str(bad), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "tiling.tile=100 is larger than image" in res.output and "Traceback" not in res.output
