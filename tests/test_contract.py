"""One contract test over every registered detector (like sklearn's parametrize_with_checks).

A detector missing from CASES fails here on purpose: every registered detector must be covered.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyimgano_core.detectors import create_detector, list_detectors
from pyimgano_core.errors import NotFittedError
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder, PyramidEmbedder
from tests.synth import normal_image, plant_blob

SMALL = {"image_size": 48, "crop": None, "coreset": {"ratio": 0.5}, "batch_size": 4}

# name -> (constructor kwargs, or None when the detector needs an optional package/file: skipped with reason)
CASES = {
    "patchcore": dict(embedder=PixelEmbedder(), **SMALL),
    "softpatch": dict(embedder=PixelEmbedder(), **SMALL),
    "anomalydino": dict(embedder=PixelEmbedder(), image_size=48),
    "openclip_patchknn": dict(embedder=PixelEmbedder(), image_size=48),
    "msflow": dict(embedder=PyramidEmbedder(), image_size=64, cond_channels=4, parallel_blocks=[1, 1, 1],
                   max_epochs=12, batch_size=4, lr=1e-3, lr_warmup_epochs=2),
}
NEEDS_EXTERNAL = {n for n in list_detectors() if n.endswith("_anomalib") or n == "anomalib_checkpoint"}


def images(n: int, seed: int, defect: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = normal_image(rng, (48, 56))
        if defect:
            plant_blob(img, rng, bright=True)
        out.append(img)
    return out


@pytest.mark.parametrize("name", list_detectors())
def test_detector_contract(name, tmp_path):
    if name in NEEDS_EXTERNAL:
        pytest.skip("needs an anomalib checkpoint; covered by tests/test_anomalib_checkpoint.py")
    assert name in CASES, f"detector {name!r} has no contract case"
    kwargs = CASES[name]
    train, test = images(6, 0), images(2, 1) + images(2, 2, defect=True)

    det = create_detector(name, **kwargs)
    with pytest.raises(NotFittedError):
        det.predict(test)
    assert det.fit(train) is det

    pred = det.predict(test)
    assert pred.scores.dtype == np.float32 and pred.scores.shape == (4,)
    assert pred.maps.dtype == np.float32 and pred.maps.ndim == 3 and len(pred.maps) == 4
    assert pred.boxes.shape == (4, 4) and pred.orig_hw.tolist() == [[48, 56]] * 4
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()
    assert pred.scores[2:].min() > pred.scores[:2].max()  # planted blobs score higher

    again = create_detector(name, **kwargs).fit(train).predict(test)  # seeded fit is deterministic
    np.testing.assert_array_equal(again.scores, pred.scores)
    np.testing.assert_array_equal(again.maps, pred.maps)

    Model(det).save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m", embedder=kwargs["embedder"]).detector
    np.testing.assert_array_equal(loaded.predict(test).scores, pred.scores)
