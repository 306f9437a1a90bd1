"""Metrics: sklearn parity for AUROC/AP, brute-force references for AUPRO and F1."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from pyimgano_core.errors import PyimganoError
from pyimgano_core.metrics import (
    aupro,
    binary_stats,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_metrics,
)

SHAPES = [(12, 15), (9, 11), (14, 10)]


def _random_case(seed: int, decimals: int | None):
    """Images of different shapes: sparse random masks give many small regions of
    different sizes, several per image, often touching only diagonally."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for shape in SHAPES:
        mask = rng.random(shape) < 0.12
        mask[2:5, 3:7] = True  # one larger blob per image
        amap = rng.random(shape) + 0.6 * mask
        if decimals is not None:  # heavy ties, also across classes
            amap = np.round(amap, decimals)
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


def _reference_aupro(masks, maps, fpr_limit):
    """Obviously-correct AUPRO: one full pass over the images per threshold."""
    regions = []
    for mask, amap in zip(masks, maps):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, n + 1)]
    background = np.concatenate([amap[~mask] for mask, amap in zip(masks, maps)])
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        xs.append(np.mean(background >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


def _flat(masks, maps):
    return (np.concatenate([m.ravel() for m in masks]),
            np.concatenate([m.ravel() for m in maps]))


# ---------------------------------------------------------------- image level

def test_image_metrics_hand_cases():
    # Classic: 3 of 4 positive/negative pairs ordered right; AP = (1/2)(1) + (1/2)(2/3).
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-12)
    assert image_ap([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6, abs=1e-12)
    # A positive tied with a negative at 0.5 earns half a pair: (1 + 1 + 0.5 + 1) / 4.
    # AP: threshold 0.9 -> R=1/2, P=1; threshold 0.5 -> R=1, P=2/3.
    labels, scores = [False, True, False, True], [0.5, 0.5, 0.2, 0.9]
    assert image_auroc(labels, scores) == pytest.approx(0.875, abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(5 / 6, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1])
def test_image_metrics_match_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = rng.normal(size=200) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-6)


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(3)
    for decimals in (None, 1):
        labels = rng.random(150) < 0.25
        scores = rng.normal(size=150) + labels
        if decimals is not None:
            scores = np.round(scores, decimals)
        best, best_t = -1.0, None
        for t in np.unique(scores)[::-1]:  # descending: keeps the highest of equal F1s
            f1 = binary_stats(labels, scores >= t)["f1"]
            if f1 > best:
                best, best_t = f1, t
        f1, threshold = f1_max(labels, scores)
        assert f1 == pytest.approx(best, abs=1e-12)
        assert threshold == best_t


def test_binary_stats_hand_case_and_zero_denominators():
    stats = binary_stats([1, 1, 0, 0, 1], [1, 0, 1, 0, 0])
    assert stats == dict(precision=0.5, recall=pytest.approx(1 / 3), f1=pytest.approx(0.4),
                         iou=0.25, tp=1, fp=1, fn=2, tn=1)
    empty = binary_stats(np.zeros((2, 3)), np.zeros((2, 3), dtype=bool))
    assert empty == dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0, tp=0, fp=0, fn=0, tn=6)


# ---------------------------------------------------------------- pixel level

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_auroc_ap_match_sklearn(seed, decimals):
    masks, maps = _random_case(seed, decimals)
    y, s = _flat(masks, maps)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, decimals, fpr_limit):
    masks, maps = _random_case(seed, decimals)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_hand_case():
    # Region A = {(0,0), (1,1)} touches only diagonally, so it is ONE region of size 2
    # (4-connectivity would split it); region B = {(0,3)}. 9 background pixels.
    mask = np.array([[1, 0, 0, 1],
                     [0, 1, 0, 0],
                     [0, 0, 0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.6, 0.4, 0.5],
                     [0.0, 0.4, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0]])
    # t=0.9: FPR 0,   PRO mean(1/2, 0) = 1/4
    # t=0.6: FPR 1/9, PRO 1/4           (background pixel 0.6)
    # t=0.5: FPR 1/9, PRO mean(1/2, 1) = 3/4
    # t=0.4: FPR 2/9, PRO 1             (A's 0.4 tied with a background 0.4)
    # t=0.0: FPR 1,   PRO 1
    # Limit 0.3: 1/9 * 1/4 + 1/9 * (3/4 + 1)/2 + (0.3 - 2/9) * 1 = 1/8 + 7/90 = 73/360,
    # divided by 0.3 -> 73/108.
    assert aupro([mask], [amap], 0.3) == pytest.approx(73 / 108, abs=1e-6)
    # Limit 0.15 falls between FPR 1/9 and 2/9: PRO(0.15) = 3/4 + 1/4 * (7/180) * 9 =
    # 67/80; area = 1/36 + (7/180) * (3/4 + 67/80) / 2 = 1689/28800; / 0.15 -> 1689/4320.
    assert aupro([mask], [amap], 0.15) == pytest.approx(1689 / 4320, abs=1e-6)


def test_pixel_metrics_bundles_the_three_and_leaves_inputs_alone():
    masks, maps = _random_case(7, 1)
    before = [m.copy() for m in maps]
    result = pixel_metrics(masks, maps, fpr_limit=0.2)
    assert set(result) == {"pixel_auroc", "pixel_ap", "aupro"}
    assert result["aupro"] == pytest.approx(_reference_aupro(masks, maps, 0.2), abs=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(before, maps))


def test_negative_scores_and_signed_zero():
    # Exercises the float -> sortable-integer key: negative values and -0.0 == 0.0.
    masks, maps = _random_case(11, 1)
    maps = [m - np.float32(0.5) for m in maps]
    # -0.0 on defect pixels, +0.0 on background: they must tie (half credit each pair).
    every_third = [np.arange(m.size).reshape(m.shape) % 3 == 0 for m in maps]
    for mask, amap, pick in zip(masks, maps, every_third):
        amap[mask & pick] = -0.0
        amap[~mask & pick] = 0.0
    y, s = _flat(masks, maps)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-6)


# ---------------------------------------------------------------- errors

def test_single_class_raises():
    with pytest.raises(ValueError, match="only normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only anomalous"):
        image_ap([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one anomalous"):
        f1_max([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="no background"):
        pixel_auroc([np.ones((3, 3), bool)], [np.zeros((3, 3))])


def test_no_regions_raises():
    with pytest.raises(ValueError, match="no defect region"):
        aupro([np.zeros((4, 4), bool), np.zeros((2, 5), bool)],
              [np.zeros((4, 4)), np.zeros((2, 5))])


def test_shape_mismatch_names_index_and_shapes():
    masks = [np.zeros((4, 4), bool), np.zeros((4, 5), bool)]
    maps = [np.zeros((4, 4)), np.zeros((5, 4))]
    with pytest.raises(ValueError, match=r"image 1.*\(4, 5\).*\(5, 4\)"):
        pixel_metrics(masks, maps)


def test_bad_inputs_raise_user_errors():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="differ"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.eye(3, dtype=bool)], [np.eye(3)], fpr_limit=0.0)
    with pytest.raises(PyimganoError):  # the CLI turns these into one-line errors
        pixel_ap([np.zeros((2, 2))], [np.zeros((2, 2))])
