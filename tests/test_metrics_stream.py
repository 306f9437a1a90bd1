"""The two-pass streaming pixel metrics equal the single-sort in-memory path (to 1e-12)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pyimgano_core.metrics import MetricInputError, f1_max, pixel_metrics
from pyimgano_core.metrics_stream import PixelMetricStream

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec_ad/bottle"


def _random_case(seed, decimals):
    rng = np.random.default_rng(seed)
    masks, maps, groups = [], [], []
    for i, shape in enumerate([(12, 15), (9, 11), (14, 10), (13, 13), (8, 9)]):
        mask = rng.random(shape) < 0.12
        if i % 2 == 0:
            mask[2:5, 3:7] = True
        amap = rng.random(shape) + 0.6 * mask
        if decimals is not None:  # heavy ties, across classes and images
            amap = np.round(amap, decimals)
        masks.append(mask)
        maps.append(amap.astype(np.float64))  # float64 input: both paths cast to float32
        groups.append("good" if not mask.any() else f"d{i % 3}")
    return masks, maps, groups


def _bottle_like(seed=0, n=12, size=(96, 96)):
    """Smooth maps (blurred noise) with blob defects scoring higher on some images; some good ones."""
    rng = np.random.default_rng(seed)
    masks, maps, groups = [], [], []
    for i in range(n):
        mask = np.zeros(size, bool)
        if i % 3:
            cv2.circle(mask.view(np.uint8), tuple(int(c) for c in rng.integers(10, 86, 2)), int(rng.integers(3, 12)), 1, -1)
        amap = cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 4) + 0.3 * cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3)
        masks.append(mask)
        maps.append(amap)
        groups.append("good" if i % 3 == 0 else ("crack" if i % 3 == 1 else "hole"))
    return masks, maps, groups


def _check(masks, maps, groups, fpr_limit=0.3):
    with PixelMetricStream() as acc:
        for mask, amap, group in zip(masks, maps, groups):
            acc.add(mask, amap, group)
        np.testing.assert_array_equal(acc.read(1), np.asarray(maps[1], np.float32))
        got, want = acc.metrics(fpr_limit), pixel_metrics(masks, maps, fpr_limit)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
        flat = [np.concatenate([np.ravel(x) for x in xs]) for xs in (masks, maps)]
        assert acc.f1_max() == pytest.approx(f1_max(flat[0], flat[1].astype(np.float32)), abs=1e-12)
        for d in sorted(set(groups) - {"good"}):
            sel = [g in ("good", d) for g in groups]
            sub = pixel_metrics([m for m, k in zip(masks, sel) if k], [m for m, k in zip(maps, sel) if k], fpr_limit)
            got = acc.metrics(fpr_limit, groups={"good", d})
            for key in sub:
                assert got[key] == pytest.approx(sub[key], abs=1e-12), (d, key)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_stream_equals_single_sort_random_with_ties(seed, decimals):
    _check(*_random_case(seed, decimals), fpr_limit=0.3 if seed else 1.0)


def test_stream_equals_single_sort_with_negative_scores_and_signed_zeros():
    masks, maps, groups = _random_case(3, 1)
    maps = [np.where(m > 0.5, m - 1.0, m) for m in maps]  # negatives, ties across the sign
    maps[0][0, :4] = [-0.0, 0.0, -0.0, 0.0]  # equal floats, different bits
    masks[0][0, :2] = True
    _check(masks, maps, groups)


def test_sortable_codes_keep_the_float_order():
    from pyimgano_core.metrics_stream import _sortable, _unsortable

    x = np.array([-np.inf, -3.5, -1e-30, 0.0, 1e-38, 2.0, np.float32(3.4e38), np.inf], np.float32)
    code = _sortable(x)
    assert (np.diff(code.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(_unsortable(code), x)


def test_chunked_cumulative_sum_is_the_whole_cumsum_bit_for_bit():
    from pyimgano_core.metrics import _cumulative_at

    rng = np.random.default_rng(4)
    weight, ids = rng.random(7), rng.integers(0, 7, 50)
    full = np.concatenate(([0.0], np.cumsum(weight[ids])))
    at = np.array([50, 0, 3, 25, 24, 26, 49, 1, 3])
    for chunk in (1, 3, 25, 50, 64):
        np.testing.assert_array_equal(_cumulative_at(weight, ids, at, chunk=chunk), full[at])


def test_stream_equals_single_sort_bottle_like():
    _check(*_bottle_like())


def test_stream_equals_single_sort_real_bottle_masks():
    masks = sorted(BOTTLE.glob("ground_truth/*/*.png"))[::6]
    if not masks:
        pytest.skip("MVTec AD bottle not available in ../shared")
    rng = np.random.default_rng(0)
    gts, maps, groups = [], [], []
    for p in masks:
        gt = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (300, 300), interpolation=cv2.INTER_NEAREST) > 127
        amap = cv2.GaussianBlur(rng.random(gt.shape).astype(np.float32), (0, 0), 5) + 0.2 * cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 6)
        gts.append(gt), maps.append(amap), groups.append(p.parent.name)
    gts.append(np.zeros((300, 300), bool)), maps.append(cv2.GaussianBlur(rng.random((300, 300)).astype(np.float32), (0, 0), 5))
    groups.append("good")
    _check(gts, maps, groups)


def test_errors_and_spill_file_left_nowhere(tmp_path):
    acc = PixelMetricStream(spill_dir=tmp_path)
    acc.add(np.zeros((4, 4), bool), np.zeros((4, 4)), "good")
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing survives a crash either
    with pytest.raises(MetricInputError, match="no defect region"):
        acc.metrics()
    with pytest.raises(MetricInputError, match=r"mask shape \(3, 3\)"):
        acc.add(np.zeros((3, 3), bool), np.zeros((4, 4)))
    with pytest.raises(MetricInputError, match="NaN"):
        acc.add(np.zeros((2, 2), bool), np.full((2, 2), np.nan))
    acc.close()
    with pytest.raises(MetricInputError, match="no anomaly maps"):
        PixelMetricStream().metrics()
    full = PixelMetricStream()
    full.add(np.ones((2, 2), bool), np.zeros((2, 2)))
    with pytest.raises(MetricInputError, match="no background"):
        full.metrics()
