"""A tiny fitted model folder for the server tests (random-weight MobileNetV2 at 48 px, calibrated)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.synth import normal_image, plant_blob, write_image

TINY = dict(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size=48, crop=None, resize_mode="squash",
            coreset={"ratio": 0.5}, pretrain_embed_dim=40, target_embed_dim=32)


def tiny_model(tmp: Path, category: str = "widget") -> tuple[Path, Path, Path]:
    """(model folder, a good image, a defective image), fitted on 6 synthetic images, 4 held out
    for the thresholds."""
    from pyimgano_core.calibration import fit_thresholds
    from pyimgano_core.detectors import create_detector
    from pyimgano_core.model import Model

    rng = np.random.default_rng(0)
    paths = [write_image(tmp / "img" / f"{i}.png", normal_image(rng, (60, 52))) for i in range(10)]
    bad = normal_image(rng, (60, 52))
    plant_blob(bad, rng, bright=True)
    det = create_detector("patchcore", **TINY).fit(paths[:6])
    model = Model(det, meta={"holdout": [str(p) for p in paths[6:10]], "category": category})
    pred = det.predict(paths[6:10])
    model.thresholds = fit_thresholds(pred.scores, list(pred.maps), 0.9, 0.99)
    good = paths[6 + int(pred.scores.argmin())]  # the lowest-scoring held-out image: below the threshold
    return model.save(tmp / f"model_{category}"), good, write_image(tmp / "bad.png", bad)


def png_bytes(image: np.ndarray) -> bytes:
    """RGB array -> PNG bytes."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]) if image.ndim == 3 else image)
    assert ok
    return buf.tobytes()
