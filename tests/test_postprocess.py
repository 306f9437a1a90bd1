"""Post-processing steps and calibration thresholds on hand-made inputs."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pyimgano_core import metrics as M
from pyimgano_core.calibration import Thresholds, fit_thresholds, split_holdout
from pyimgano_core.data.types import Sample
from pyimgano_core.detectors import create_detector
from pyimgano_core.model import Model
from pyimgano_core.postprocess import AnomalyMapPostprocess, PostprocessConfig
from tests.helpers import PixelEmbedder
from tests.synth import normal_image


def post(**kw) -> AnomalyMapPostprocess:
    return AnomalyMapPostprocess(PostprocessConfig(**kw))


def test_default_is_identity():
    m = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    np.testing.assert_array_equal(post().transform(m), m)


def test_percentile_normalisation_per_image():
    m = np.arange(101, dtype=np.float32).reshape(1, 101)  # percentiles of 0..100 are the values themselves
    out = post(normalize="percentile", percentiles=(10, 90)).transform(m)
    assert out[0, 10] == pytest.approx(0.0) and out[0, 90] == pytest.approx(1.0) and out[0, 50] == pytest.approx(0.5)


def test_minmax_and_zscore_use_calibration_statistics_and_keep_metrics():
    rng = np.random.default_rng(1)
    normal = [rng.normal(2.0, 0.5, (8, 8)).astype(np.float32) for _ in range(3)]
    pp = post(normalize="minmax").fit(normal)
    lo, hi = min(m.min() for m in normal), max(m.max() for m in normal)
    np.testing.assert_allclose(pp.transform(normal[0]), (normal[0] - lo) / (hi - lo), rtol=1e-6)
    z = post(normalize="zscore").fit(normal)
    allv = np.concatenate([m.ravel() for m in normal])
    np.testing.assert_allclose(z.transform(normal[1]), (normal[1] - allv.mean()) / allv.std(), rtol=1e-5, atol=1e-6)
    # a global affine map cannot change pixel AUROC / AUPRO
    masks = [rng.random((8, 8)) > 0.8 for _ in range(3)]
    maps = [rng.random((8, 8)).astype(np.float32) for _ in range(3)]
    before = M.pixel_metrics(masks, maps)
    after = M.pixel_metrics(masks, [z.transform(m) for m in maps])
    assert after["pixel_auroc"] == pytest.approx(before["pixel_auroc"]) and after["aupro"] == pytest.approx(before["aupro"])
    with pytest.raises(ValueError, match="calibration"):
        post(normalize="zscore").transform(maps[0])


def test_clip_and_blur():
    m = np.array([[-1.0, 0.5, 3.0]], np.float32)
    np.testing.assert_array_equal(post(clip=(0, 1)).transform(m), [[0.0, 0.5, 1.0]])
    impulse = np.zeros((21, 21), np.float32)
    impulse[10, 10] = 1
    b = post(blur_sigma=2.0).transform(impulse)
    assert b.sum() == pytest.approx(1.0, abs=1e-4) and b[10, 10] == b.max() and b[10, 12] == pytest.approx(b[12, 10])


def test_component_filter_removes_exactly_the_small_blobs():
    m = np.zeros((20, 20), np.float32)
    m[1:3, 1:3] = 1  # 4 px
    m[10:15, 10:15] = 1  # 25 px
    m[0, 19] = 1  # 1 px
    mask = post(min_area=5).binarize(m, 0.5)
    expected = np.zeros((20, 20), bool)
    expected[10:15, 10:15] = True
    np.testing.assert_array_equal(mask, expected)


def test_morphology_open_and_close():
    m = np.zeros((12, 12), np.float32)
    m[2:9, 2:9] = 1
    m[5, 5] = 0  # a pinhole: closing fills it
    m[0, 11] = 1  # a speck: opening removes it
    closed = post(morphology="close", kernel_size=3).binarize(m, 0.5)
    assert closed[5, 5] and closed[0, 11]
    opened = post(morphology="open", kernel_size=3).binarize(m, 0.5)
    assert not opened[0, 11] and opened[3, 3]


def test_bad_postprocess_settings_are_config_errors():
    with pytest.raises(ValidationError):
        PostprocessConfig(percentiles=(90, 10))
    with pytest.raises(ValidationError):
        PostprocessConfig(clip=(1, 0))
    with pytest.raises(ValidationError):
        PostprocessConfig(normalise="minmax")


def test_thresholds_are_quantiles_of_known_distributions():
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100: conformal rank ceil(101 * 0.99) = 100
    thr = fit_thresholds(scores, [np.linspace(0, 1, 1001, dtype=np.float32)], image_q=0.99, pixel_q=0.999)
    assert thr.image == 100 and thr.expected_fpr == pytest.approx(1 / 101) and thr.pixel == pytest.approx(0.999, abs=1e-6)
    normal = np.random.default_rng(0).normal(0, 1, 200_000)
    assert fit_thresholds(normal, None, 0.975, 0.5).image == pytest.approx(1.96, abs=0.03)


def test_holdout_is_seeded_disjoint_and_nonempty():
    train = [Sample(path=f"/x/{i}.png", label=0) for i in range(10)]
    fit, hold = split_holdout(train, 0.2, seed=3)
    assert len(hold) == 2 and len(fit) == 8 and not {s.path for s in fit} & {s.path for s in hold}
    assert split_holdout(train, 0.2, seed=3) == (fit, hold)
    assert len(split_holdout(train[:3], 0.01, seed=0)[1]) == 1


def test_thresholds_and_postprocess_survive_save_load(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [normal_image(rng, (32, 32)) for _ in range(4)]
    det = create_detector("patchcore", embedder=PixelEmbedder(), image_size=32, crop=None, coreset={"ratio": 0.5}).fit(imgs)
    pp = post(normalize="zscore", min_area=3).fit([np.ones((4, 4)), np.zeros((4, 4))])
    Model(det, pp, Thresholds(1.5, 0.25, 0.99, 0.999, 4, 0.1)).save(tmp_path / "m")
    m = Model.load(tmp_path / "m", embedder=PixelEmbedder())
    assert m.thresholds == Thresholds(1.5, 0.25, 0.99, 0.999, 4, 0.1)
    assert m.postprocess.stats_ == pp.stats_ and m.postprocess.config == pp.config
