"""faiss IndexFlat search agrees with the torch search (skipped without the 'faiss' extra)."""
from __future__ import annotations

import numpy as np
import pytest

from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchknn import make_index
from tests.helpers import PixelEmbedder
from tests.synth import normal_image, plant_blob

pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install 'pyimgano[faiss]')")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_matches_torch(metric):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(500, 24)).astype(np.float32), rng.normal(size=(300, 24)).astype(np.float32)
    dt, it = make_index({"kind": "exact"}, metric).fit(bank).search(queries, k=3)
    df, jf = make_index({"kind": "flat"}, metric).fit(bank).search(queries, k=3)
    np.testing.assert_array_equal(it, jf)
    np.testing.assert_allclose(dt, df, rtol=1e-4, atol=1e-4)


def test_patchcore_with_faiss_backend_scores_like_torch():
    rng = np.random.default_rng(1)
    train = [normal_image(rng, (40, 40)) for _ in range(5)]
    test = [normal_image(rng, (40, 40)) for _ in range(2)]
    plant_blob(test[1], rng, bright=True)
    kw = dict(embedder=PixelEmbedder(), image_size=40, crop=None, coreset={"ratio": 0.5})
    a = create_detector("patchcore", **kw).fit(train).predict(test)
    b = create_detector("patchcore", knn={"kind": "flat"}, **kw).fit(train).predict(test)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-3, atol=1e-4)
