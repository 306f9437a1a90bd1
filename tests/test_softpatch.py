"""SoftPatch: noise scores against independent references, planted noisy patches dropped from
the memory bank, soft weights, seeded determinism, save/load, config errors, CLI end to end."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from sklearn.neighbors import LocalOutlierFactor
from synth import make_mvtec_tree, normal_image

from pyimgano_core.config import validate_config
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchcore import PatchCore
from pyimgano_core.detectors.softpatch import (
    TIE_RTOL,
    SoftPatch,
    gaussian_scores,
    lof_scores,
    matched_weight,
    nearest_scores,
    soft_weights,
)
from pyimgano_core.errors import ConfigError, DataError
from pyimgano_core.model import Model

DISCRIMINATORS = ["lof", "nearest", "gaussian"]
BLOCK = 8  # embedder patch size in pixels


class BlockEmbedder:
    """Deterministic, weight-free patch features: per-channel mean and std of each 8x8 block.

    float [B, 3, H, W] in [0, 1] -> [B, H/8, W/8, 6].
    """

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixels.shape
        blocks = pixels.reshape(B, C, H // BLOCK, BLOCK, W // BLOCK, BLOCK).permute(0, 2, 4, 1, 3, 5).flatten(-2)
        return torch.cat([blocks.mean(-1), blocks.std(-1)], dim=-1)


def params(**kw):
    base = dict(image_size=32, crop=None, coreset={"ratio": 1.0}, blur_sigma=0.0, batch_size=16)
    return base | kw


def softpatch(**kw) -> SoftPatch:
    return SoftPatch(embedder=BlockEmbedder(), **params(**kw))


# Planted defects: (image index, block row, block col, value). Distinct positions, so every
# planted patch is alone at its position (a defect repeated at one position in many images is
# by construction normal for a per-position discriminator).
PLANTED = [(3, 0, 1, 250), (11, 2, 2, 5), (20, 3, 0, 250)]


@pytest.fixture(scope="module")
def train_images():
    rng = np.random.default_rng(0)
    images = [normal_image(rng, (32, 32)) for _ in range(30)]
    for i, r, c, v in PLANTED:
        images[i][r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = v
    return images


def planted_features(images) -> np.ndarray:
    feats = BlockEmbedder()(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).numpy()
    return np.stack([feats[i, r, c] for i, r, c, _ in PLANTED])


def rows_in(memory: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row: is it (to float tolerance) one of the memory entries?"""
    d = np.linalg.norm(memory[None, :, :] - rows[:, None, :], axis=-1)
    return d.min(1) < 1e-6


# ------------------------------------------------------------- noise scores vs references
def test_lof_matches_sklearn_per_position():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 40, 5)).astype(np.float32)
    x[1, 7] += 6  # one outlier at position 1
    for k in (1, 6, 39, 60):  # 60 > N - 1: capped like sklearn
        ours = lof_scores(torch.from_numpy(x), k).numpy()
        with pytest.warns(UserWarning) if k > 39 else contextlib.nullcontext():
            ref = np.stack([-LocalOutlierFactor(n_neighbors=k).fit(xi).negative_outlier_factor_ for xi in x])
        np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert lof_scores(torch.from_numpy(x), 6)[1].argmax() == 7


def test_nearest_and_gaussian_match_brute_force():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 25, 4))
    near_ref, maha_ref = [], []
    for xi in x:
        d = np.linalg.norm(xi[:, None] - xi[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        near_ref.append(d.min(1))
        delta = xi - xi.mean(0)
        inv = np.linalg.inv(np.cov(xi, rowvar=False) + 0.01 * np.eye(4))
        maha_ref.append(np.sqrt(np.einsum("ij,jk,ik->i", delta, inv, delta)))
    xt = torch.from_numpy(x).float()
    np.testing.assert_allclose(nearest_scores(xt).numpy(), near_ref, rtol=1e-5)
    np.testing.assert_allclose(gaussian_scores(xt).numpy(), maha_ref, rtol=1e-4)


def test_soft_weights_follow_the_reference():
    s = np.array([0.5, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(soft_weights(s, "lof"), s)
    np.testing.assert_array_equal(soft_weights(s, "nearest"), s + 1)
    np.testing.assert_array_equal(soft_weights(s, "gaussian"), s + 1)


# ------------------------------------------------------------- planted noise is dropped
@pytest.mark.parametrize("method", DISCRIMINATORS)
def test_planted_noisy_patches_are_dropped_and_weigh_more(train_images, method):
    det = softpatch(noise_discriminator=method).fit(train_images)
    scores = det.train_outlier_scores_  # (30, 4, 4)
    planted = np.zeros(scores.shape, bool)
    for i, r, c, _ in PLANTED:
        planted[i, r, c] = True
    # every planted patch scores above every clean patch, so it is above the cut and excluded
    assert scores[planted].min() > scores[~planted].max()
    assert scores[planted].min() > det.outlier_cutoff_
    n = scores.size
    assert det.n_excluded_patches_ == n - int(np.floor(0.85 * (n - 1))) - 1  # strictly above the 0.85 quantile
    assert len(det.memory_) == n - det.n_excluded_patches_  # coreset.ratio=1: every kept patch
    assert not rows_in(det.memory_, planted_features(train_images)).any()
    # soft weights: contaminated > clean, and the memory keeps the clean patches' weights
    w = soft_weights(scores.ravel(), method).reshape(scores.shape)
    assert w[planted].min() > w[~planted].max()
    kept = scores.ravel() <= det.outlier_cutoff_
    np.testing.assert_array_equal(det.memory_weights_, w.ravel()[kept])


def test_noisy_patches_slipping_through_keep_their_high_weight(train_images):
    # threshold small enough that only the single worst patch is cut: the other planted
    # patches reach the memory, and they carry the largest weights in it.
    det = softpatch(threshold=1 / 480).fit(train_images)
    assert det.n_excluded_patches_ == 1
    inside = rows_in(det.memory_, planted_features(train_images))
    assert inside.sum() == 2
    feats = planted_features(train_images)[inside]
    d = np.linalg.norm(det.memory_[:, None] - feats[None], axis=-1).min(1)
    is_planted = d < 1e-6
    assert det.memory_weights_[is_planted].min() > det.memory_weights_[~is_planted].max()


def test_small_coreset_patchcore_keeps_outliers_softpatch_does_not(train_images):
    # Greedy k-center picks the farthest patches first: plain PatchCore's 5% coreset holds
    # the planted defects, SoftPatch's holds none.
    kw = params(coreset={"ratio": 0.05})
    pc = PatchCore(embedder=BlockEmbedder(), **kw).fit(train_images)
    sp = SoftPatch(embedder=BlockEmbedder(), **kw).fit(train_images)
    assert len(pc.memory_) == len(sp.memory_) == int(480 * 0.05)
    assert rows_in(pc.memory_, planted_features(train_images)).all()
    assert not rows_in(sp.memory_, planted_features(train_images)).any()


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_test_patch_distance_is_multiplied_by_matched_weight(train_images, distance):
    """Reference (squared, the default): faiss IndexFlatL2's d^2 times the matched entry's weight."""
    det = softpatch(threshold=1 / 480, distance=distance).fit(train_images)
    scale = np.square if distance == "squared" else (lambda x: x)
    rng = np.random.default_rng(5)
    tests = [normal_image(rng, (32, 32)) for _ in range(3)] + [train_images[3], train_images[11]]
    pred = det.predict(tests)
    feats = BlockEmbedder()(torch.from_numpy(np.stack(tests)).permute(0, 3, 1, 2).float() / 255).numpy()
    q = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    d = np.linalg.norm(q[:, None] - det.memory_[None].astype(np.float64), axis=-1)
    nn = d.argmin(1)
    patch = (scale(d[np.arange(len(q)), nn]) * det.memory_weights_[nn]).reshape(len(tests), -1)
    # the shared kNN search expands |q - m|^2 in float32: distances carry ~1e-4 absolute noise
    np.testing.assert_allclose(pred.scores, patch.max(1), rtol=1e-3, atol=1e-3)
    assert pred.scores[4] > 10 * pred.scores[:4].max()  # a planted patch matched itself: its weight is huge
    # exactly: score = max over patches of (search distance * weight of the matched entry, shared at near-ties)
    dists, idx = det._knn().search(q.astype(np.float32), k=4)
    w = matched_weight(torch.from_numpy(np.square(dists)), torch.from_numpy(idx), torch.from_numpy(det.memory_weights_)).numpy()
    exact = (scale(dists[:, 0]) * w).reshape(len(tests), -1)
    np.testing.assert_array_equal(pred.scores, exact.max(1).astype(np.float32))
    # maps are the same weighted patch grid, upsampled: the hottest pixel lies in the hottest patch
    hot = np.unravel_index(pred.maps[4].argmax(), pred.maps[4].shape)
    assert (hot[0] // BLOCK) * 4 + hot[1] // BLOCK == exact[4].argmax()
    unweighted = softpatch(threshold=1 / 480, soft_weight=False, distance=distance).fit(train_images).predict(tests)
    np.testing.assert_array_equal(unweighted.scores, scale(dists[:, 0]).reshape(len(tests), -1).max(1))


def test_matched_weight_is_the_nearest_entrys_unless_tied():
    w = torch.tensor([1.0, 1.5, 2.0, 3.0])
    idx = torch.tensor([[0, 1, 2, 3]] * 4)
    d2 = torch.tensor([[4.0, 4.0 * (1 + 2 * TIE_RTOL), 9.0, 9.0],  # runner-up outside the window: the reference's weight
                       [4.0, 4.0, 9.0, 9.0],  # exact tie: the mean of the tied entries' weights
                       [4.0, 4.0 * (1 + TIE_RTOL / 2), 9.0, 9.0],  # half-way: the runner-up counts half
                       [4.0, 4.0, 4.0, 4.0]])
    got = matched_weight(d2, idx, w).numpy()
    np.testing.assert_allclose(got, [1.0, 1.25, (1.0 + 0.5 * 1.5) / 1.5, 1.875], rtol=1e-6)
    assert got[0] == 1.0  # bitwise: the other entries' shares are exactly 0
    # which of two tied entries a search lists first does not matter
    assert matched_weight(d2[1:2], idx[1:2].flip(1)[:, [2, 3, 0, 1]], w).item() == pytest.approx(1.25, rel=1e-7)
    assert matched_weight(torch.zeros(1, 2), torch.tensor([[2, 3]]), w).item() == 2.5  # exact matches tie too


def test_matched_weight_does_not_flip_with_rounding_noise():
    """Two runtimes see the same near-tied distances up to independent float rounding noise: the
    nearest entry's weight (the reference rule) then flips between the tied entries for about half
    of the ties, while the shared weight moves by a rounding-sized amount."""
    rng = np.random.default_rng(0)
    n = 2000
    base = rng.uniform(1, 100, n)
    d2 = np.stack([base, base * (1 + rng.uniform(-1e-7, 1e-7, n)), base * 1.3, base * 1.5], 1)
    d2 = np.sort(d2, 1)
    idx = np.argsort(rng.random((n, 64)), 1)[:, :4]  # four distinct bank entries per query
    w = rng.uniform(1.0, 1.6, 64).astype(np.float32)
    runs = []
    for seed in (1, 2):  # "torch" and "onnxruntime": relative rounding noise ~1e-6 on every distance
        noisy = d2 * (1 + np.random.default_rng(seed).normal(0, 1e-6, d2.shape))
        order = np.argsort(noisy, 1)
        runs.append((np.take_along_axis(noisy, order, 1), np.take_along_axis(idx, order, 1)))
    nearest = [w[i[:, 0]] for _, i in runs]
    assert np.mean(nearest[0] != nearest[1]) > 0.2  # the reference rule disagrees with itself
    shared = [matched_weight(torch.from_numpy(a.astype(np.float32)), torch.from_numpy(i), torch.from_numpy(w)).numpy() for a, i in runs]
    assert np.max(np.abs(shared[0] - shared[1]) / shared[0]) < 1e-4


# ------------------------------------------------------------- determinism and persistence
def test_seeded_fit_is_deterministic(train_images):
    kw = dict(coreset={"ratio": 0.25}, noise_projection_dim=4, seed=3)  # projection + coreset in play
    a, b = softpatch(**kw).fit(train_images), softpatch(**kw).fit(train_images)
    np.testing.assert_array_equal(a.memory_, b.memory_)
    np.testing.assert_array_equal(a.memory_weights_, b.memory_weights_)
    np.testing.assert_array_equal(a.train_outlier_scores_, b.train_outlier_scores_)
    np.testing.assert_array_equal(a.predict(train_images[:4]).scores, b.predict(train_images[:4]).scores)
    c = softpatch(**(kw | {"seed": 4})).fit(train_images)
    assert not np.array_equal(a.train_outlier_scores_, c.train_outlier_scores_)  # the seed draws the projection


def test_save_load_gives_identical_scores(train_images, tmp_path):
    det = softpatch(coreset={"ratio": 0.3}, noise_discriminator="gaussian").fit(train_images)
    before = det.predict(train_images[:5])
    folder = Model(det).save(tmp_path / "model")
    loaded = Model.load(folder, embedder=BlockEmbedder())
    after = loaded.detector.predict(train_images[:5])
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    np.testing.assert_array_equal(loaded.detector.memory_weights_, det.memory_weights_)
    np.testing.assert_array_equal(loaded.detector.train_outlier_scores_, det.train_outlier_scores_)
    assert loaded.detector.params_.noise_discriminator == "gaussian"
    assert loaded.detector.n_excluded_patches_ == det.n_excluded_patches_
    # the soft weights are part of the model: dropping them changes the scores
    assert not np.allclose(softpatch(coreset={"ratio": 0.3}, noise_discriminator="gaussian", soft_weight=False)
                           .fit(train_images).predict(train_images[:5]).scores, before.scores)


# ------------------------------------------------------------- parameters and errors
def _cfg(**detector_params) -> dict:
    return {"name": "t", "dataset": {"type": "mvtec_ad", "root": "x", "category": "widget"},
            "detector": {"name": "softpatch", "params": detector_params}}


@pytest.mark.parametrize("bad, field", [
    ({"threshold": 0}, "threshold"), ({"threshold": 1.0}, "threshold"), ({"threshold": -0.1}, "threshold"),
    ({"noise_discriminator": "knn"}, "noise_discriminator"), ({"lof_k": 0}, "lof_k"),
    ({"noise_projection_dim": 0}, "noise_projection_dim"), ({"treshold": 0.1}, "treshold"),
])
def test_bad_params_fail_with_their_path(bad, field):
    with pytest.raises(ConfigError, match=rf"detector\.params\.{field}"):
        validate_config(_cfg(**bad))
    with pytest.raises(ValidationError):
        SoftPatch(embedder=BlockEmbedder(), **bad).fit([np.zeros((32, 32, 3), np.uint8)] * 2)


def test_defaults_match_patchcore_geometry_and_are_registered():
    cfg = validate_config(_cfg())
    p = cfg.detector.params
    assert (p["image_size"], p["crop"], p["noise_discriminator"], p["threshold"], p["lof_k"]) == (256, 224, "lof", 0.15, 6)
    assert isinstance(create_detector("softpatch"), SoftPatch)
    with pytest.raises(ConfigError, match="softpatch"):
        validate_config(_cfg() | {"detector": {"name": "softpach"}})


def test_one_training_image_is_a_clear_error():
    with pytest.raises(DataError, match="at least 2 training images"):
        softpatch().fit([np.zeros((32, 32, 3), np.uint8)])


# ------------------------------------------------------------- CLI end to end
def test_cli_eval_with_contamination_records_moved_files(tmp_path):
    from typer.testing import CliRunner

    from pyimgano_cli.app import app

    root = make_mvtec_tree(tmp_path / "data", n_train=10, n_test_good=3, defects={"scratch": 3, "dent": 3}, size=(48, 48))
    config = {
        "name": "sp_noisy", "seed": 0,
        "dataset": {"type": "mvtec_ad", "root": str(root), "category": "widget",
                    "contamination": {"ratio": 0.2, "seed": 1, "overlap": False}},
        "detector": {"name": "softpatch", "params": {
            "backbone": "mobilenet_v2", "layers": ["features.6", "features.13"], "weights": None,
            "image_size": 48, "crop": None, "pretrain_embed_dim": 64, "target_embed_dim": 64,
            "coreset": {"ratio": 0.1}}},
        "metrics": {"resolution": "original"},
    }
    path = tmp_path / "softpatch.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(path), "--out", str(tmp_path / "reports"), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "reports" / "sp_noisy" / "widget" / "report.json").read_text())
    moved = report["notes"]["contamination"]["moved"]
    assert len(moved) == 2 and all(m.startswith("test/") and "/good/" not in m for m in moved)
    assert all((root / "widget" / m).is_file() for m in moved)
    assert report["counts"]["train"] == 12 and report["counts"]["test"] == 3 + 6 - 2
    scored = [json.loads(line)["path"] for line in (tmp_path / "reports" / "sp_noisy" / "widget" / "predictions.jsonl").open()]
    assert not {str(root / "widget" / m) for m in moved} & {str(Path(p)) for p in scored}
    assert report["detector"] == "softpatch" and report["metrics"]["pixel_auroc"] is not None
    assert {"noise_scoring_s", "coreset_s", "embed_s"} <= set(report["timing"]["fit_detail"])

    bad = runner.invoke(app, ["eval", str(path), "--set", "detector.params.threshold=1.5", "--quiet"])
    assert bad.exit_code != 0 and "detector.params.threshold" in bad.output
