"""Approximate nearest-neighbour indexes (faiss HNSW / IVF): recall, exactness limits, parameter
validation, pickle-free save/load and a corrupt saved index. Skipped without the 'faiss' extra."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.config import validate_config
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchknn.index import default_nlist, make_index
from pyimgano_core.errors import ConfigError, ModelError
from pyimgano_core.model import Model
from tests.helpers import PixelEmbedder, write_config
from tests.synth import make_mvtec_tree, normal_image, plant_blob

pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install 'pyimgano[faiss]')")


def _clustered(rng, n, d=32, centers=40):
    """Data with cluster structure, like patch features (uniform noise makes ANN look worse than it is)."""
    c = rng.normal(size=(centers, d)) * 3
    return (c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def _brute(bank, q, metric):
    if metric == "cosine":
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = 1 - q.astype(np.float64) @ bank.T.astype(np.float64)
    else:
        d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    return d


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kind,opts", [("hnsw", {}), ("ivf", {})])
def test_approximate_search_recall_and_only_overestimates(metric, kind, opts):
    rng = np.random.default_rng(0)
    bank, q = _clustered(rng, 3000), _clustered(rng, 400)
    ref = _brute(bank, q, metric)
    d, i = make_index({"kind": kind, **opts}, metric).fit(bank).search(q, k=3)
    assert d.shape == i.shape == (400, 3) and d.dtype == np.float32 and i.dtype == np.int64
    recall1 = np.mean(i[:, 0] == ref.argmin(1))
    assert recall1 >= 0.9, recall1
    # the distance returned is the true distance to the entry returned ...
    np.testing.assert_allclose(d, np.take_along_axis(ref, i, 1), rtol=1e-4, atol=1e-4)
    # ... so it can only over-estimate the true nearest distance
    assert (d[:, 0] >= ref.min(1) - 1e-4).all()
    assert (np.diff(d, axis=1) >= -1e-5).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exhaustive_settings_equal_exact_search(metric):
    rng = np.random.default_rng(1)
    bank, q = _clustered(rng, 800), _clustered(rng, 200)
    de, ie = make_index({"kind": "exact"}, metric).fit(bank).search(q, k=2)
    # IVF visiting every list is an exhaustive scan; HNSW with a candidate list >= the bank too
    # pca_ivf with pca_dim = D (a rotation), every list visited and the whole bank re-ranked: exhaustive too
    for idx in (make_index({"kind": "ivf", "nlist": 8, "nprobe": 8}, metric),
                make_index({"kind": "hnsw", "ef_search": 1024}, metric),
                make_index({"kind": "pca_ivf", "pca_dim": 32, "nlist": 8, "nprobe": 8, "rerank_candidates": 800}, metric)):
        d, i = idx.fit(bank).search(q, k=2)
        np.testing.assert_array_equal(i, ie)
        np.testing.assert_allclose(d, de, rtol=1e-4, atol=1e-4)


def _low_rank(rng, n, d=64, rank=8, centers=30):
    """Features on a low-dimensional subspace plus small noise (patch features are highly redundant)."""
    basis = np.random.default_rng(99).normal(size=(rank, d))
    c = np.random.default_rng(98).normal(size=(centers, rank)) * 3
    z = c[rng.integers(centers, size=n)] + rng.normal(size=(n, rank))
    return (z @ basis + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pca_ivf_candidates_reranked_exactly(metric):
    """Coarse search in 16 PCA dimensions, exact re-rank in 64: recall, exact distances, over-estimates only."""
    rng = np.random.default_rng(5)
    bank, q = _low_rank(rng, 4000), _low_rank(rng, 300)
    ref = _brute(bank, q, metric)
    idx = make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 32, "nprobe": 8, "rerank_candidates": 16}, metric).fit(bank)
    d, i = idx.search(q, k=2)
    assert d.shape == i.shape == (300, 2) and d.dtype == np.float32 and i.dtype == np.int64
    assert np.mean(i[:, 0] == ref.argmin(1)) >= 0.95
    np.testing.assert_allclose(d, np.take_along_axis(ref, i, 1), rtol=1e-4, atol=1e-4)  # exact for the entry returned
    assert (d[:, 0] >= ref.min(1) - 1e-4).all() and (np.diff(d, axis=1) >= -1e-6).all()
    arrays, extras = idx.save()  # the faiss way (PCA + IVF in one blob), restored identically
    again = make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 32, "nprobe": 8, "rerank_candidates": 16}, metric).load(bank, arrays, extras)
    d2, i2 = again.search(q, k=2)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_array_equal(d2, d)



@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pca_ivf_coarse_stage_is_faiss_own(metric):
    """The projection and list assignment done in torch propose the candidates faiss's own chain does."""
    rng = np.random.default_rng(6)
    bank, q = _low_rank(rng, 3000), _low_rank(rng, 200)
    idx = make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 32, "nprobe": 4, "rerank_candidates": 8}, metric).fit(bank)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
    _, theirs = idx.index_.search(np.ascontiguousarray(qn, dtype=np.float32), 8)  # PCAMatrix + quantizer + scan
    d, i = idx.search(q, k=1)
    cand_d = np.take_along_axis(_brute(bank, q, metric), np.maximum(theirs, 0), 1)
    np.testing.assert_array_equal(i[:, 0], theirs[np.arange(len(q)), cand_d.argmin(1)])  # the best of faiss's candidates
    np.testing.assert_allclose(d[:, 0], cand_d.min(1), rtol=1e-5, atol=1e-5)


def test_pca_ivf_saved_index_checks():
    rng = np.random.default_rng(6)
    bank = _low_rank(rng, 600)
    arrays, extras = make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 4, "nprobe": 2}).fit(bank).save()
    bad = arrays["knn_index_"].copy()
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ModelError, match="corrupt"):
        make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 4, "nprobe": 2}).load(bank, {"knn_index_": bad}, extras)
    with pytest.raises(ModelError, match="expected a IndexPreTransform"):  # an ivf blob is not a pca_ivf index
        ivf_arrays, ivf_extras = make_index({"kind": "ivf", "nlist": 4, "nprobe": 2}).fit(bank).save()
        make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 4, "nprobe": 2}).load(bank, ivf_arrays, ivf_extras)
    with pytest.raises(ModelError, match="expected"):  # saved with another pca_dim
        make_index({"kind": "pca_ivf", "pca_dim": 8, "nlist": 4, "nprobe": 2}).load(bank, arrays, extras)


def test_pca_ivf_sizes_beyond_the_bank_are_config_errors():
    bank = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"detector\.params\.knn\.pca_dim=16 .* 8 feature dimensions"):
        make_index({"kind": "pca_ivf", "pca_dim": 16, "nlist": 2, "nprobe": 1}).fit(bank)
    with pytest.raises(ConfigError, match=r"detector\.params\.knn\.rerank_candidates=64 .* 50 memory entries"):
        make_index({"kind": "pca_ivf", "pca_dim": 4, "nlist": 2, "nprobe": 1, "rerank_candidates": 64}).fit(bank)


@pytest.mark.parametrize("kind,metric", [("ivf", "l2"), ("pca_ivf", "l2"), ("pca_ivf", "cosine")])
def test_ivf_rows_missing_neighbours_fall_back_to_exact(kind, metric):
    rng = np.random.default_rng(2)
    bank, q = _clustered(rng, 400, centers=4), _clustered(rng, 50, centers=4)
    # 16 tiny lists, one visited, k (and pca_ivf's candidates) larger than most lists: faiss returns -1
    # there; those candidates must not be read as bank row -1 (the re-rank clamps and masks them)
    extra = {"pca_dim": 8, "rerank_candidates": 60} if kind == "pca_ivf" else {}
    d, i = make_index({"kind": kind, "nlist": 16, "nprobe": 1, **extra}, metric).fit(bank).search(q, k=60)
    assert (i >= 0).all() and np.isfinite(d).all()
    assert all(len(set(row)) == 60 for row in i.tolist())
    ref = _brute(bank, q, metric)
    np.testing.assert_allclose(d, np.take_along_axis(ref, i, 1), rtol=1e-4, atol=1e-4)


def test_default_nlist():
    assert default_nlist(16385) == 420 and default_nlist(157000) == 1585 and default_nlist(100) == 2 and default_nlist(10) == 1


def test_ivf_more_lists_than_entries_is_config_error():
    bank = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"detector\.params\.knn\.nlist=64 .* 50 memory entries"):
        make_index({"kind": "ivf", "nlist": 64, "nprobe": 4}).fit(bank)


def _detector(**kw):
    return create_detector("patchcore", embedder=PixelEmbedder(), image_size=40, crop=None, coreset={"ratio": 0.5}, **kw)


def _images(seed=3):
    rng = np.random.default_rng(seed)
    train = [normal_image(rng, (40, 40)) for _ in range(6)]
    test = [normal_image(rng, (40, 40)) for _ in range(3)]
    plant_blob(test[2], rng, bright=True)
    return train, test


@pytest.mark.parametrize("kw", [dict(knn={"kind": "hnsw", "ef_search": 512}), dict(knn={"kind": "ivf", "nlist": 4, "nprobe": 4}),
                                dict(knn={"kind": "pca_ivf", "nlist": 4, "nprobe": 4, "pca_dim": 27, "rerank_candidates": 300})])
def test_detector_exhaustive_approximate_scores_like_exact_and_save_load(kw, tmp_path):
    train, test = _images()
    exact = _detector().fit(train).predict(test)
    det = _detector(**kw).fit(train)
    assert "index_s" in det.timing_
    approx = det.predict(test)
    np.testing.assert_allclose(approx.scores, exact.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(approx.maps, exact.maps, rtol=1e-3, atol=1e-4)
    Model(det).save(tmp_path / "m")
    with np.load(tmp_path / "m/arrays.npz", allow_pickle=False) as z:
        assert z["knn_index_"].dtype == np.uint8 and z["knn_index_"].size > 0
    again = Model.load(tmp_path / "m", embedder=PixelEmbedder()).detector.predict(test)
    np.testing.assert_array_equal(again.scores, approx.scores)


def test_ivf_nlist_beyond_training_patches_fails_before_the_memory_bank():
    train, _ = _images()  # 6 images x 10x10 patches = 600 training patches
    with pytest.raises(ConfigError, match=r"knn\.nlist=1000 .* 600 training patches"):
        _detector(knn={"kind": "ivf", "nlist": 1000, "nprobe": 8}).fit(train)
    with pytest.raises(ConfigError, match=r"knn\.nlist=400 .* 300 memory entries"):  # 50% coreset
        _detector(knn={"kind": "ivf", "nlist": 400, "nprobe": 8}).fit(train)


@pytest.mark.parametrize("params,field", [
    ({"knn": {"kind": "ivf", "nlist": 4, "nprobe": 8}}, "nprobe=8"),
    ({"knn": {"kind": "exact", "m": 16}}, r"knn\.m: unknown key; allowed: kind"),
    ({"knn": {"kind": "hnsw", "nprobe": 4}}, r"knn\.nprobe: unknown key; allowed: ef_construction, ef_search, kind, m"),
    ({"knn": {"kind": "hnsw", "ef_search": 0}}, r"knn\.ef_search"),
    ({"knn": {"kind": "annoy"}}, "knn"),
    ({"knn": {"kind": "ivf", "pca_dim": 32}}, r"knn\.pca_dim: unknown key"),
    ({"knn": {"kind": "pca_ivf", "rerank_candidates": 0}}, "rerank_candidates"),
    ({"knn": {"kind": "pca_ivf", "pca_dim": 0}}, "pca_dim"),
    ({"knn": {"kind": "pca_ivf", "nlist": 4, "nprobe": 8}}, "nprobe=8"),
    # the flat keys of earlier releases are rewritten, then validated the same way
    ({"knn_index": "ivf", "ivf_nlist": 4, "ivf_nprobe": 8}, "nprobe=8"),
    ({"knn_index": "exact", "hnsw_m": 16}, r"knn\.m: unknown key"),
    ({"knn_index": "hnsw", "knn_backend": "faiss"}, "knn_backend only applies to knn_index: exact"),
])
def test_bad_index_parameters_are_config_errors_naming_the_field(params, field):
    cfg = {"name": "t", "dataset": {"type": "mvtec_ad", "root": ".", "category": "bottle"},
           "detector": {"name": "patchcore", "params": params}}
    with pytest.raises(ConfigError, match=field) as e:
        validate_config(cfg)
    assert "detector.params" in str(e.value)


def test_corrupt_saved_index_is_one_line_exit_4(tmp_path):
    tree = make_mvtec_tree(tmp_path / "data", n_train=6, n_test_good=2)
    params = {"backbone": "resnet18", "layers": ["layer1", "layer2"], "weights": None, "image_size": 64, "crop": None,
              "coreset": {"ratio": 0.5}, "pretrain_embed_dim": 64, "target_embed_dim": 64, "knn": {"kind": "hnsw"}}
    cfg = write_config(tmp_path / "c.yaml", tree, params=params)
    runner = CliRunner()
    assert runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "m"), "-q"]).exit_code == 0
    folder = next((tmp_path / "m").rglob("model.json")).parent
    with np.load(folder / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["knn_index_"] = arrays["knn_index_"].copy()
    arrays["knn_index_"][len(arrays["knn_index_"]) // 2] ^= 0xFF
    np.savez(folder / "arrays.npz", **arrays)
    res = runner.invoke(app, ["eval", str(cfg), "--model", str(folder.parent.parent), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 4, res.output
    assert "corrupt" in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    doc = json.loads((folder / "model.json").read_text())
    assert len(doc["state"]["knn_index_sha256"]) == 64
