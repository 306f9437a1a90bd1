"""Configs and model folders written for the flat patch-kNN keys (before ``coreset:`` / ``knn:`` had
their own sections) keep working: one warning line per key naming its new path, identical scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.config import load_config
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchcore import PatchCoreParams
from pyimgano_core.legacy import upgrade_flat_keys
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder, write_config
from tests.synth import make_mvtec_tree, normal_image, plant_blob

# what 85eb923's PatchCoreParams dumped for these sections (every flat key, the inapplicable ones at their defaults)
FLAT_DUMP = {"coreset_ratio": 0.5, "coreset_projection_dim": 128, "coreset_method": "greedy", "coreset_chunk_points": 200000,
             "knn_backend": "torch", "knn_index": "pca_ivf", "hnsw_m": 32, "hnsw_ef_construction": 80, "hnsw_ef_search": 64,
             "ivf_nlist": 4, "ivf_nprobe": 2, "pca_dim": 27, "rerank_candidates": 300}


@pytest.mark.parametrize("flat, nested", [
    (FLAT_DUMP, {"coreset": {"method": "exact", "ratio": 0.5, "projection_dim": 128},
                 "knn": {"kind": "pca_ivf", "nlist": 4, "nprobe": 2, "pca_dim": 27, "rerank_candidates": 300}}),
    ({"coreset_method": "chunked", "coreset_chunk_points": 5000, "knn_backend": "faiss"},
     {"coreset": {"method": "chunked", "ratio": 0.1, "chunk_points": 5000}, "knn": {"kind": "flat"}}),
    ({"knn_index": "hnsw", "hnsw_ef_search": 128}, {"knn": {"kind": "hnsw", "ef_search": 128}}),
])
def test_flat_keys_become_the_nested_sections(flat, nested):
    upgraded, notes = upgrade_flat_keys(PatchCoreParams, flat)
    assert PatchCoreParams.model_validate(upgraded) == PatchCoreParams.model_validate(nested)
    assert len(notes) == len(flat) and all("is now detector.params." in n for n in notes)


def test_flat_keys_beside_their_section_are_refused():
    with pytest.raises(ValueError, match="coreset_ratio and coreset both set"):
        upgrade_flat_keys(PatchCoreParams, {"coreset_ratio": 0.1, "coreset": {"ratio": 0.2}})


def test_old_config_runs_with_one_warning_line_per_key(tmp_path):
    tree = make_mvtec_tree(tmp_path / "d", n_train=4, n_test_good=2)
    cfg = write_config(tmp_path / "c.yaml", tree)
    data = yaml.safe_load(cfg.read_text())
    data["detector"]["params"].pop("coreset", None)
    data["detector"]["params"].update(coreset_ratio=0.5, knn_index="hnsw", hnsw_ef_search=128)
    cfg.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(cfg)])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: detector.params.coreset_ratio is now detector.params.coreset.ratio; the flat key is accepted for this release",
                        "warning: detector.params.knn_index is now detector.params.knn.kind; the flat key is accepted for this release",
                        "warning: detector.params.hnsw_ef_search is now detector.params.knn.ef_search; the flat key is accepted for this release"]
    params = load_config(cfg).detector.params  # what a run and its report hold: the nested form
    assert params["coreset"]["ratio"] == 0.5 and params["knn"] == {"kind": "hnsw", "m": 32, "ef_construction": 80, "ef_search": 128}


def test_model_folder_with_flat_params_loads_and_scores_identically(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    train = [normal_image(rng, (40, 40)) for _ in range(6)]
    test = [normal_image(rng, (40, 40)) for _ in range(3)]
    plant_blob(test[2], rng, bright=True)
    nested = {"coreset": {"ratio": 0.5}, "knn": {"kind": "pca_ivf", "nlist": 4, "nprobe": 2, "pca_dim": 27, "rerank_candidates": 300}}
    det = create_detector("patchcore", embedder=PixelEmbedder(), image_size=40, crop=None, **nested).fit(train)
    folder = Model(det).save(tmp_path / "m")
    want = Model.load(folder, embedder=PixelEmbedder()).detector.predict(test)
    doc = json.loads((folder / "model.json").read_text())  # rewrite the parameters as 85eb923 saved them
    params = {k: v for k, v in doc["params"].items() if k not in ("coreset", "knn")}
    doc["params"] = {**params, **FLAT_DUMP}
    doc.pop("model_json_sha256", None)  # folders of that release carry no seal of their own
    (folder / "model.json").write_text(json.dumps(doc))
    loaded = Model.load(folder, embedder=PixelEmbedder()).detector
    assert loaded.params_.knn.kind == "pca_ivf" and loaded.params_.coreset.ratio == 0.5
    got = loaded.predict(test)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.maps, want.maps)
