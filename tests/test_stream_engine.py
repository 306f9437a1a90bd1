"""The streaming engine: each image predicted once (a bad file is a per-image error), metrics from
the spilled maps equal the in-memory single-sort path, exports keep input order."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pyimgano_core import engine
from pyimgano_core.config import validate_config
from pyimgano_core.data import load_splits
from pyimgano_core.data.io import read_mask
from pyimgano_core.detectors import create_detector
from pyimgano_core.metrics import f1_max, pixel_metrics
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder
from tests.synth import make_mvtec_tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_mvtec_tree(root, n_train=6, n_test_good=4, defects={"crack": 3, "hole": 3}, size=(48, 48))
    cfg = validate_config({"name": "t", "seed": 0, "dataset": {"type": "mvtec_ad", "root": str(root), "category": "widget"},
                           "detector": {"name": "patchcore", "params": {"image_size": 48, "crop": None, "coreset": {"ratio": 0.5}}}})
    split = load_splits(cfg.dataset)[0]
    det = create_detector("patchcore", embedder=PixelEmbedder(), image_size=48, crop=None, coreset={"ratio": 0.5})
    return cfg, split, Model(det.fit([s.path for s in split.train]))


class Counting:
    """Wraps a detector's predict and counts the images it sees."""

    def __init__(self, detector):
        self.detector, self.seen = detector, 0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def predict(self, images, **kw):
        self.seen += len(images)
        return self.detector.predict(images, **kw)


def test_bad_file_is_a_per_image_error_and_nothing_is_predicted_twice(setup, tmp_path, monkeypatch):
    _, split, model = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = [s.path for s in split.test]
    images = paths[:5] + [bad] + paths[5:] + [np.zeros((4, 4), np.uint8)]
    monkeypatch.setattr(engine, "CHUNK", 4)  # several chunks, the bad file in the middle of one
    counting = Model(Counting(model.detector), model.postprocess)
    out = list(engine.score_stream(counting, images))
    assert [s.index for s in out] == list(range(len(images)))
    assert counting.detector.seen == len(paths)  # each readable image exactly once
    assert "broken.png" in out[5].error and "HxWx3 uint8" in out[-1].error
    alone = {s.index: s.score for s in engine.score_stream(model, paths)}
    good = [s for s in out if s.error is None]
    np.testing.assert_allclose([s.score for s in good], [alone[i] for i in range(len(paths))], rtol=1e-6)



def test_image_the_model_cannot_use_fails_alone_in_the_same_pass(setup, monkeypatch):
    """An image smaller than the patch grid decodes fine but cannot be scored: it is a per-image error
    of the prediction, and the chunk's other images are not predicted a second time."""
    _, split, model = setup
    paths = [s.path for s in split.test]
    tiny = np.full((2, 2, 3), 128, np.uint8)
    images = paths[:2] + [tiny] + paths[2:]
    monkeypatch.setattr(engine, "CHUNK", 4)
    counting = Model(Counting(model.detector), model.postprocess)
    out = list(engine.score_stream(counting, images))
    assert counting.detector.seen == len(images)  # every decodable image once, the tiny one included
    assert [s.index for s in out] == list(range(len(images)))
    assert "image #2 is 2x2 px, smaller than the model's" in out[2].error
    alone = {s.index: s.score for s in engine.score_stream(model, paths)}
    good = [s.score for s in out if s.error is None]
    np.testing.assert_allclose(good, [alone[i] for i in range(len(paths))], rtol=1e-6)
    with pytest.raises(engine.DataError, match="smaller than the model's") as err:  # the detector API itself raises
        model.detector.predict([paths[0], tiny])
    assert err.value.image_index == 1


def test_evaluate_split_streamed_metrics_equal_in_memory_path(setup, tmp_path):
    cfg, split, model = setup
    report = engine.evaluate_split(cfg, split, model, tmp_path / "out")
    masks, maps, kinds = [], [], []
    for s in engine.score_stream(model, [x.path for x in split.test]):
        x = split.test[s.index]
        gt = read_mask(x.mask_path, split.mask_threshold)[s.region] if x.mask_path else np.zeros(s.amap.shape, bool)
        masks.append(gt), maps.append(s.amap), kinds.append(x.defect_type)
    want = pixel_metrics(masks, maps, cfg.metrics.aupro_fpr_limit)
    for key, value in want.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-12), key
    for d in ("crack", "hole"):
        sel = [k in ("good", d) for k in kinds]
        sub = pixel_metrics([m for m, k in zip(masks, sel) if k], [m for m, k in zip(maps, sel) if k], cfg.metrics.aupro_fpr_limit)
        for key, value in sub.items():
            assert report["per_defect"][d][key] == pytest.approx(value, abs=1e-12), (d, key)
    assert report["counts"]["pixel_evaluated"] == len(split.test)


def test_pixel_decisions_and_oracle_f1_summed_per_image_equal_concatenated(setup, tmp_path):
    cfg, split, model = setup
    from pyimgano_core.calibration import Thresholds

    masks, maps = [], []
    for s in engine.score_stream(model, [x.path for x in split.test]):
        x = split.test[s.index]
        masks.append(read_mask(x.mask_path, split.mask_threshold)[s.region] if x.mask_path else np.zeros(s.amap.shape, bool))
        maps.append(s.amap)
    flat_gt, flat_map = np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    thr = float(np.quantile(flat_map, 0.95))
    calibrated = Model(model.detector, model.postprocess, Thresholds(image=0.5, pixel=thr, image_quantile=0.99, pixel_quantile=0.999,
                                                                     n_images=1, pixel_median=0.1))
    report = engine.evaluate_split(cfg, split, calibrated, tmp_path / "out")
    pix = report["decisions"]["pixel"]
    assert (pix["tp"], pix["fp"]) == (int((flat_gt & (flat_map >= thr)).sum()), int((~flat_gt & (flat_map >= thr)).sum()))
    assert pix["tp"] > 0 and pix["fp"] > 0
    oracle = report["decisions"]["oracle_f1_max_NOT_a_deployable_threshold"]["pixel_f1_max"]
    assert oracle == pytest.approx(f1_max(flat_gt, flat_map)[0], abs=1e-12)


def test_export_rows_in_input_order_with_writer_pool(setup, tmp_path, monkeypatch):
    _, split, model = setup
    monkeypatch.setattr(engine, "CHUNK", 3)
    paths = [s.path for s in split.test]
    summary = engine.export_images(model, paths, tmp_path / "x", base=paths[0].parents[2])
    rows = [json.loads(line) for line in (tmp_path / "x/predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths] and summary["n_scored"] == len(paths)
    for r in rows:
        amap = np.load(r["files"]["map"])
        assert amap.shape == (48, 48) and (tmp_path / "x").exists()
