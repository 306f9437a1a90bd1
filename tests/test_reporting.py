"""Report curves, gates and compare against independent references (sklearn, direct counts)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

from pyimgano_core import metrics as M
from pyimgano_core.errors import ConfigError
from pyimgano_core.outputs.report import METRIC_NAMES
from pyimgano_core.outputs.report.curves import N_POINTS, PixelCurves, float_keys, image_curves, key_threshold
from pyimgano_core.outputs.report.gates import check_gates, parse_gates
from pyimgano_core.runs import METRIC_KEYS


def test_metric_names_match_the_runs_keys():
    assert tuple(METRIC_NAMES) == METRIC_KEYS


def test_float_keys_order_and_thresholds_are_exact():
    rng = np.random.default_rng(0)
    x = np.concatenate((rng.normal(0, 3, 5000), [0.0, -0.0, 1e-30, -1e-30, 7.25, 7.250001])).astype(np.float32)
    keys = float_keys(x)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(keys[order]) >= 0)  # monotone
    for k in np.unique(keys)[::97]:
        t = key_threshold(np.array([k]))[0]
        assert np.array_equal(keys >= k, x >= t)  # score >= threshold  <=>  key >= bin


def test_image_curves_equal_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    s = np.round(rng.normal(y * 1.2, 1.0), 1)  # rounded: many ties
    c = image_curves(y, s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(c["roc"]["fpr"], fpr, atol=1e-6) and np.allclose(c["roc"]["tpr"], tpr, atol=1e-6)
    assert c["roc"]["threshold"][0] is None and np.allclose(c["roc"]["threshold"][1:], thr[1:])
    prec, rec, _ = precision_recall_curve(y, s)
    # sklearn lists the PR curve from the lowest threshold up and appends (recall 0, precision 1)
    assert np.allclose(c["pr"]["recall"], rec[:-1][::-1], atol=1e-6)
    assert np.allclose(c["pr"]["precision"], prec[:-1][::-1], atol=1e-6)
    assert image_curves(np.zeros(5), np.arange(5.0)) is None


def _maps(seed=0, n=6, hw=(48, 40)):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        m = np.zeros(hw, bool)
        if i % 3:  # two of three images defective, one or two blobs
            m[5 + i:14 + i, 6:15] = True
            if i % 2:
                m[30:34, 20 + i:26 + i] = True
        a = rng.normal(0, 1, hw).astype(np.float32) + 2.0 * m
        masks.append(m)
        maps.append(a)
    return masks, maps


def test_pixel_curve_points_are_exact_and_areas_match_metrics():
    masks, maps = _maps()
    acc = PixelCurves(fpr_limit=0.3)
    for i, (m, a) in enumerate(zip(masks, maps)):
        acc.add(m, a, owner=i)
    curves, per_image = acc.finish()
    gt = np.concatenate([m.ravel() for m in masks])
    sc = np.concatenate([a.ravel() for a in maps])
    roc = curves["roc"]
    assert len(roc["fpr"]) <= N_POINTS + 2 and roc["fpr"][0] == 0 and roc["tpr"][0] == 0
    assert roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1  # exact endpoints
    for f, t, thr in list(zip(roc["fpr"], roc["tpr"], roc["threshold"]))[1::7]:
        pred = sc >= thr  # every stored point is the exact rate at its threshold
        assert f == pytest.approx(pred[~gt].mean(), abs=1e-6) and t == pytest.approx(pred[gt].mean(), abs=1e-6)
    pr = curves["pr"]
    for r, p, thr in list(zip(pr["recall"], pr["precision"], pr["threshold"]))[::11]:
        pred = sc >= thr
        assert p == pytest.approx(gt[pred].mean(), abs=1e-6) and r == pytest.approx(pred[gt].mean(), abs=1e-6)
    ref = M.pixel_metrics(masks, maps, fpr_limit=0.3)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(ref["pixel_auroc"], abs=2e-3)
    pro = curves["pro"]
    assert pro["fpr"][0] == 0 and pro["fpr"][-1] == pytest.approx(0.3)
    assert np.trapezoid(pro["pro"], pro["fpr"]) / 0.3 == pytest.approx(ref["aupro"], abs=3e-3)
    # the pooled AUPRO is the region-weighted mean of the per-image ones (same operating points)
    regions = {i: ndimage.label(masks[i], structure=np.ones((3, 3)))[1] for i in per_image}
    pooled = np.average([per_image[i] for i in per_image], weights=[regions[i] for i in per_image])
    assert pooled == pytest.approx(ref["aupro"], abs=3e-3)
    assert set(per_image) == {i for i, m in enumerate(masks) if m.any()}


def test_per_image_aupro_ranks_a_missed_defect_last():
    masks, maps = _maps(n=4)
    maps[2] = maps[2] - 2.0 * masks[2]  # image 2's defect scores like background
    acc = PixelCurves(0.3)
    for i, (m, a) in enumerate(zip(masks, maps)):
        acc.add(m, a, i)
    _, per_image = acc.finish()
    assert min(per_image, key=per_image.get) == 2 and per_image[2] < 0.3 < per_image[1]


def test_gates_parse_and_check():
    assert parse_gates("image_auroc=0.99, aupro=0.9") == {"image_auroc": 0.99, "aupro": 0.9}
    assert parse_gates(None) == {}
    with pytest.raises(ConfigError, match="unknown metric 'auroc'; allowed: image_auroc, image_ap, pixel_auroc, pixel_ap, aupro"):
        parse_gates("auroc=0.9")
    for bad in ("aupro", "aupro=high", "aupro=1.5"):
        with pytest.raises(ConfigError, match="aupro=<number in"):
            parse_gates(bad)
    summary = {"categories": {"a": {"metrics": {"image_auroc": 0.995, "aupro": 0.85}},
                              "b": {"metrics": {"image_auroc": 0.98, "aupro": None}}}}
    lines = check_gates(summary, {"image_auroc": 0.99, "aupro": 0.9})
    assert lines == ["a: aupro 0.8500 < 0.9000", "b: image_auroc 0.9800 < 0.9900",
                     "b: aupro was not computed (needs both classes / pixel ground truth); required >= 0.900"]
    assert check_gates(summary, {"image_auroc": 0.9}) == []
