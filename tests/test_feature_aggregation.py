"""Issue 18: patch-feature aggregation modes, image-score rules, and both in the protocol and the saved model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.config import validate_config
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchcore import PatchCoreParams, make_cnn_embedder
from pyimgano_core.detectors.patchknn import aggregate
from pyimgano_core.errors import ConfigError
from pyimgano_core.features.backbones import FeatureExtractor
from pyimgano_core.features.patch_embed import ConcatPatchEmbedder
from pyimgano_core.model import Model
from tests.test_backbones import _reference_embed

CNN = dict(backbone="resnet18", layers=["layer2", "layer3"], weights=None, image_size=64, crop=None, resize_mode="squash",
           coreset={"ratio": 1.0})


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _anomalib_concat(maps: list[torch.Tensor], weights=None) -> torch.Tensor:
    """anomalib's PatchcoreModel.generate_embedding, restated: nn.AvgPool2d(3, 1, 1) on each tap,
    deeper taps F.interpolate(bilinear) to the first tap's size, torch.cat on channels; -> (N, D)."""
    pool = torch.nn.AvgPool2d(3, 1, 1)
    pooled = [pool(m) for m in maps]
    emb = pooled[0] * (1.0 if weights is None else weights[0])
    for i, m in enumerate(pooled[1:], start=1):
        up = F.interpolate(m, size=emb.shape[-2:], mode="bilinear") * (1.0 if weights is None else weights[i])
        emb = torch.cat((emb, up), 1)
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])


# --------------------------------------------------------------------------- feature aggregation
def test_reference_mode_is_the_step_by_step_reference():
    p = PatchCoreParams(**CNN, feature_aggregation="reference", pretrain_embed_dim=96, target_embed_dim=64)
    emb = make_cnn_embedder(p)
    x = torch.rand(2, 3, 64, 80)
    ours = emb(x)
    assert ours.shape == (2, 8, 10, 64)
    torch.testing.assert_close(ours.reshape(-1, 64), _reference_embed(emb.extractor(x), 96, 64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [None, [2.0, 0.5]])
def test_concat_mode_is_anomalibs_embedding(weights):
    p = PatchCoreParams(**CNN, feature_aggregation="concat", layer_weights=weights)
    emb = make_cnn_embedder(p)
    assert isinstance(emb, ConcatPatchEmbedder) and emb.target_dim == 128 + 256
    x = torch.rand(2, 3, 64, 80)
    ours = emb(x)
    assert ours.shape == (2, 8, 10, 384)
    torch.testing.assert_close(ours.reshape(-1, 384), _anomalib_concat(emb.extractor(x), weights), rtol=1e-5, atol=1e-6)
    if weights is not None:  # the weight scales exactly its own layer's block
        plain = ConcatPatchEmbedder(emb.extractor)(x)
        torch.testing.assert_close(ours[..., :128], 2.0 * plain[..., :128])
        torch.testing.assert_close(ours[..., 128:], 0.5 * plain[..., 128:])


def _cfg(params: dict) -> dict:
    return {"name": "t", "dataset": {"type": "mvtec_ad", "root": ".", "category": "bottle"},
            "detector": {"name": "patchcore", "params": params}}


@pytest.mark.parametrize("params,message", [
    (dict(feature_aggregation="concat", layer_weights=[1.0, 2.0, 3.0]), "detector.params.layer_weights: 3 weights for 2 layers"),
    (dict(feature_aggregation="concat", layer_weights=[1.0, 0.0]), "detector.params.layer_weights: weights must be positive"),
    (dict(layer_weights=[1.0, 1.0]), "layer_weights only applies to feature_aggregation: concat"),
    (dict(feature_aggregation="concat", target_embed_dim=256), "target_embed_dim only applies to feature_aggregation: reference"),
    (dict(feature_aggregation="average"), "detector.params.feature_aggregation: must be 'reference' or 'concat'"),
    (dict(aggregation="max", topk=3), "topk only applies to aggregation: topk_mean"),
    (dict(aggregation="topk_mean", topk=3, topk_ratio=0.1), "topk and topk_ratio both set"),
    (dict(aggregation="topk_mean", topk=0), "detector.params.topk: Input should be greater than or equal to 1"),
    (dict(aggregation="blurred_max", reweight_neighbors=9), "reweight_neighbors (paper eq. 7) reweights the max patch score"),
])
def test_bad_options_are_config_errors_naming_the_field(params, message):
    with pytest.raises(ConfigError) as exc:
        validate_config(_cfg(dict(CNN, **params)))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_layer_weights_of_the_wrong_length_fail_in_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_cfg(dict(CNN, feature_aggregation="concat"))))
    res = CliRunner().invoke(app, ["validate", str(cfg), "--set", "detector.params.layer_weights=[1, 2, 3]"])
    assert res.exit_code == 2 and "detector.params.layer_weights" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_even_patch_size_with_concat_is_a_config_error():
    with pytest.raises(ConfigError, match="patch_size=2"):
        create_detector("patchcore", **CNN, feature_aggregation="concat", patch_size=2).fit(_images(2))


# --------------------------------------------------------------------------- image-score rules
def test_aggregate_rules_against_hand_computed_values():
    patch = np.array([[[1, 5], [3, 2]], [[0, 0], [4, 4]]], dtype=np.float32)
    np.testing.assert_allclose(aggregate(patch, "topk_mean", topk=2), [4.0, 4.0])
    np.testing.assert_allclose(aggregate(patch, "topk_mean", topk=3), [10 / 3, 8 / 3])
    np.testing.assert_allclose(aggregate(patch, "topk_mean", topk_ratio=0.5), [4.0, 4.0])
    maps = [np.full((3, 3), 7.0), np.arange(9.0).reshape(3, 3)]
    np.testing.assert_allclose(aggregate(patch, "blurred_max", maps=maps), [7.0, 8.0])
    with pytest.raises(ValueError, match="topk=5"):
        aggregate(patch, "topk_mean", topk=5)


def test_topk_larger_than_the_patch_grid_fails_before_the_fit():
    det = create_detector("patchcore", **CNN, aggregation="topk_mean", topk=65)  # 64 px -> 8x8 = 64 patches
    with pytest.raises(ConfigError, match=r"detector.params.topk=65 is more than the 64 patches \(8x8\)"):
        det.fit(_images(2))


def test_rules_from_one_prediction_match_each_detector():
    """Each rule as a detector option equals the rule applied to the plain detector's patch grid / maps."""
    train, test = _images(3), _images(3, seed=1)
    base = create_detector("patchcore", **CNN).fit(train)
    pred = base.predict(test)
    k3 = create_detector("patchcore", **CNN, aggregation="topk_mean", topk=3).fit(train).predict(test)
    blurred = create_detector("patchcore", **CNN, aggregation="blurred_max").fit(train).predict(test)
    np.testing.assert_allclose(blurred.scores, pred.maps.reshape(len(test), -1).max(1), rtol=1e-6)
    np.testing.assert_array_equal(blurred.maps, pred.maps)
    assert np.all(k3.scores <= pred.scores) and np.all(blurred.scores <= pred.scores * (1 + 1e-6))
    assert not np.allclose(k3.scores, pred.scores)


# --------------------------------------------------------------------------- protocol and saved model
def test_concat_model_saves_loads_and_states_its_protocol(tmp_path):
    train, test = _images(3), _images(2, seed=1)
    det = create_detector("patchcore", **CNN, feature_aggregation="concat", layer_weights=[1.5, 1.0],
                          aggregation="topk_mean", topk=4).fit(train)
    before = det.predict(test)
    folder = Model(det).save(tmp_path / "m")
    doc = json.loads((folder / "model.json").read_text())
    assert doc["params"]["feature_aggregation"] == "concat" and doc["params"]["layer_weights"] == [1.5, 1.0]
    assert doc["params"]["aggregation"] == "topk_mean" and doc["params"]["topk"] == 4
    loaded = Model.load(folder).detector
    after = loaded.predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    proto = loaded.protocol()
    assert proto["patch_features"].startswith("concat (anomalib's PatchCore)") and "[1.5, 1.0]" in proto["patch_features"]
    assert proto["image_score"] == "aggregation topk_mean: mean of the top 4 patch scores"
    ref = create_detector("patchcore", **CNN, reweight_neighbors=3).fit(train).protocol()
    assert ref["patch_features"].startswith("reference (PatchCore code's _embed)") and "eq. 7" in ref["image_score"]


def test_report_protocol_records_the_choices(tmp_path):
    from tests.helpers import write_config
    from tests.synth import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "data", n_train=3, n_test_good=2, defects={"blob": 2})
    cfg = write_config(tmp_path / "c.yaml", root, detector="patchcore", params=dict(CNN, feature_aggregation="concat",
                                                                                   aggregation="blurred_max"))
    res = CliRunner().invoke(app, ["eval", str(cfg), "--quiet", "--set", f"output.root={tmp_path / 'out'}", "--set", "output.html=false"])
    assert res.exit_code == 0, res.output
    report = json.loads(next((tmp_path / "out").rglob("report.json")).read_text())
    assert report["protocol"]["patch_features"].startswith("concat (anomalib's PatchCore): resnet18 taps layer2, layer3")
    assert report["protocol"]["image_score"].startswith("aggregation blurred_max: max of the anomaly map")


@pytest.mark.parametrize("params,word", [(dict(feature_aggregation="concat"), "feature_aggregation 'concat'"),
                                         (dict(aggregation="blurred_max"), "aggregation blurred_max"),
                                         (dict(aggregation="topk_mean", topk=3), "topk is not in the graph")])
def test_export_onnx_refuses_what_its_graph_does_not_compute(tmp_path, params, word):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = Model(create_detector("patchcore", **dict(CNN, **params)).fit(_images(2))).save(tmp_path / "m")
    res = CliRunner().invoke(app, ["export-onnx", str(folder)])
    assert res.exit_code == 4 and word in res.output and len(res.output.strip().splitlines()) == 1
    assert not (folder / "model.onnx").exists()
