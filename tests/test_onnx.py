"""ONNX export: graph pieces against their references, parity per supported detector setting,
refusals (unsupported models, tampered graphs, parity failures) and the torch-free runtime."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.calibration import fit_thresholds
from pyimgano_core.deploy.graph import AdaptiveAvgPool1d, GaussianBlur, LocalPatchHead, reflect_indices
from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchknn import upsample
from pyimgano_core.errors import ModelError
from pyimgano_core.infer import load_model
from pyimgano_core.model import Model
from tests.helpers import write_config
from tests.synth import make_mvtec_tree, normal_image, write_image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from pyimgano_core.deploy import onnx_export  # noqa: E402
from pyimgano_core.deploy.onnx_export import export_onnx  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CNN = dict(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size=48, crop=None, resize_mode="squash",
           coreset={"ratio": 0.5}, pretrain_embed_dim=40, target_embed_dim=32)
SETTINGS = {  # patchcore with defaults (max, blur 4) is the CLI fixture's model below
    "patchcore_topk_mean_no_blur": ("patchcore", dict(CNN, aggregation="topk_mean", topk_ratio=0.1, blur_sigma=0.0)),
    "softpatch_soft_weights": ("softpatch", CNN),
    "softpatch_hard_filter_crop": ("softpatch", dict(CNN, soft_weight=False, noise_discriminator="nearest", image_size=56, crop=48)),
    "anomalydino_cnn": ("anomalydino", dict(backbone="torchvision:mobilenet_v2", layers=["features.3", "features.6"],
                                            weights=None, image_size=48, blur_at="input")),  # the graph blurs at the input
}

# settings that exist only once the detectors have them (squared distances; faiss for the exact search)
_CNN_FIELDS = create_detector("patchcore").Params.model_fields
if "distance" in _CNN_FIELDS:
    SETTINGS["softpatch_squared"] = ("softpatch", dict(CNN, distance="squared"))
    SETTINGS["patchcore_euclidean_even_patch"] = ("patchcore", dict(CNN, distance="euclidean", patch_size=2))
try:
    import faiss  # noqa: F401

    SETTINGS["patchcore_faiss_exact"] = ("patchcore", dict(CNN, knn={"kind": "flat"}))
except ImportError:
    pass


# ------------------------------------------------------------------ graph pieces vs references
@pytest.mark.parametrize("n,pad", [(7, 3), (5, 5), (3, 7)])
def test_reflect_indices_match_cv2_border_reflect(n, pad):
    ref = [cv2.borderInterpolate(i, n, cv2.BORDER_REFLECT) for i in range(-pad, n + pad)]
    assert reflect_indices(n, pad).tolist() == ref


@pytest.mark.parametrize("sigma,hw", [(4.0, (40, 56)), (1.5, (9, 12))])
def test_blur_matches_cv2_gaussian_blur(sigma, hw):
    m = np.random.default_rng(0).random((2, *hw)).astype(np.float32)
    got = GaussianBlur(sigma, hw)(torch.from_numpy(m)).numpy()
    r = int(4 * sigma + 0.5)
    ref = np.stack([cv2.GaussianBlur(x, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_REFLECT) for x in m])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("length,out", [(288, 40), (27, 64), (100, 100), (96, 32)])
def test_adaptive_pool_equals_torch(length, out):
    x = torch.randn(3, 5, length)
    np.testing.assert_array_equal(AdaptiveAvgPool1d(length, out)(x).numpy(), F.adaptive_avg_pool1d(x.view(-1, 1, length), out).view(3, 5, out).numpy())


def test_local_patch_head_equals_embedder_and_upsampling_equals_cv2():
    from pyimgano_core.detectors.patchcore import PatchCoreParams, make_cnn_embedder

    emb = make_cnn_embedder(PatchCoreParams.model_validate(CNN))
    x = torch.rand(2, 3, 48, 48)
    np.testing.assert_array_equal(LocalPatchHead(emb)(x).numpy(), emb(x).numpy())
    grid = np.random.default_rng(1).random((2, 6, 6)).astype(np.float32)
    torch_up = F.interpolate(torch.from_numpy(grid)[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(torch_up, upsample(grid, (48, 48), sigma=0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ exported models
def _images(folder: Path, n: int, size=(60, 52)) -> list[Path]:
    rng = np.random.default_rng(0)
    return [write_image(folder / f"{i}.png", normal_image(rng, size)) for i in range(n)]


def _saved(tmp: Path, name: str, params: dict, calibrated: bool = True) -> Path:
    paths = _images(tmp / "img", 7)
    det = create_detector(name, **params).fit(paths[:4])
    model = Model(det, meta={"holdout": [str(p) for p in paths[4:]] if calibrated else []})
    if calibrated:
        pred = det.predict(paths[4:])
        model.thresholds = fit_thresholds(pred.scores, list(pred.maps), 0.9, 0.99)
    return model.save(tmp / "model")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_export_parity_per_setting(setting, tmp_path):
    name, params = SETTINGS[setting]
    folder = _saved(tmp_path, name, params)
    info = export_onnx(folder)
    par = info["parity"]
    assert par["images"] == "calibration images" and par["n_images"] == 3 and par["decision_flips"] == 0
    assert par["max_score_rel_diff"] <= 1e-4 and par["max_map_rel_diff"] <= 1e-4
    doc = json.loads((folder / "model.json").read_text())
    assert doc["onnx"]["sha256"] == info["sha256"] and doc["onnx"]["inputs"][0]["dtype"] == "uint8"
    # an image the parity check never saw, through the public API of both runtimes
    probe = write_image(tmp_path / "probe.png", np.clip(normal_image(np.random.default_rng(5), (60, 52)) + 60, 0, 255).astype(np.uint8))
    a, b = load_model(folder).predict(probe), load_model(folder, runtime="onnx").predict(probe)
    assert abs(a.score - b.score) <= 1e-4 * abs(a.score) and a.is_anomalous == b.is_anomalous
    np.testing.assert_array_equal(np.isnan(a.anomaly_map), np.isnan(b.anomaly_map))
    assert np.nanmax(np.abs(a.anomaly_map - b.anomaly_map)) <= 1e-4 * np.nanmax(np.abs(a.anomaly_map))


def test_uncalibrated_model_synthetic_parity_and_tampered_graph(tmp_path):
    folder = _saved(tmp_path, "softpatch", CNN, calibrated=False)
    with pytest.raises(ModelError, match="no ONNX graph"):
        load_model(folder, runtime="onnx")
    info = export_onnx(folder, out=tmp_path / "elsewhere" / "g.onnx")
    assert info["parity"]["images"].startswith("synthetic") and info["parity"]["decision_flips"] is None
    assert Path(info["file"]).is_absolute() and info["parity"]["max_map_rel_diff"] <= 1e-4
    assert load_model(folder, runtime="onnx").predict(_images(tmp_path / "x", 1)[0]).is_anomalous is None
    data = bytearray(Path(info["file"]).read_bytes())
    data[-1] ^= 1  # one flipped bit in the graph file
    Path(info["file"]).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match .* recorded in model.json"):
        load_model(folder, runtime="onnx")
    res = runner.invoke(app, ["export-maps", "--runtime", "onnx", "--model", str(folder), "--input", str(tmp_path / "x"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 4 and "sha256" in res.output and len(res.output.strip().splitlines()) == 1


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    folder = _saved(tmp_path, "patchcore", CNN)
    real = onnx_export.build_graph

    def wrong_blur(*a, **k):  # a graph bug: the blur disagrees with the torch path's
        g = real(*a, **k)
        g.blur = GaussianBlur(1.0, g.input_hw)
        return g

    monkeypatch.setattr(onnx_export, "build_graph", wrong_blur)
    with pytest.raises(ModelError, match=r"beyond the tolerance 0.0001 .*largest score difference .*largest map difference"):
        export_onnx(folder)
    assert not (folder / "model.onnx").exists() and "onnx" not in json.loads((folder / "model.json").read_text())


def test_planted_ties_share_the_weight_in_both_runtimes(tmp_path):
    """Pairs of memory entries f + e, f - e, equidistant (up to float rounding) from the hottest
    patches f of the calibration images, with weights 1.0 and 1.6: which one is "nearest" is then
    decided by each runtime's rounding, and the reference rule (the nearest entry's weight) would
    jump by 60% between them. The shared rule (softpatch.matched_weight, traced into the graph)
    gives both runtimes the tie's mean weight."""
    from pyimgano_core.data.io import read_image
    from pyimgano_core.deploy.onnx_runtime import load_onnx_model
    from pyimgano_core.detectors.softpatch import matched_weight

    paths = _images(tmp_path / "img", 7)
    for k, p in enumerate(paths[4:]):  # calibration images with a defect: distances well above float rounding
        im = read_image(p)
        im[8 + 10 * k : 24 + 10 * k, 10:26] = np.roll([250, 20, 20], k)
        write_image(p, im)
    det = create_detector("softpatch", **dict(CNN, distance="squared")).fit(paths[:4])
    rng = np.random.default_rng(3)
    planted, mem = [], []
    for feats, _ in det._embed(paths[4:], {}):
        for f in feats.reshape(len(feats), -1, feats.shape[-1]):
            d, _ = det._knn().search(f, k=1)
            for j in np.argsort(-d[:, 0])[:1]:  # the hottest patch: the image score
                e = rng.standard_normal(f.shape[1]).astype(np.float32)
                e *= 0.5 * d[j, 0] / np.linalg.norm(e)
                mem += [f[j] + e, f[j] - e]
                planted.append(f[j])
    n0 = len(det.memory_)
    det.memory_ = np.concatenate([det.memory_, np.stack(mem)]).astype(np.float32)
    det.memory_weights_ = np.concatenate([det.memory_weights_, np.tile(np.float32([1.0, 1.6]), len(planted))])
    det._index = det.scorer_ = None
    d, idx = det._knn().search(np.stack(planted), k=4)
    assert (idx[:, :2] >= n0).all() and (d[:, 1] ** 2 - d[:, 0] ** 2 <= 1e-3 * d[:, 0] ** 2).all()  # tied to float rounding
    w = matched_weight(torch.from_numpy(d**2), torch.from_numpy(idx), torch.from_numpy(det.memory_weights_)).numpy()
    np.testing.assert_allclose(w, 1.3, rtol=5e-3)  # the mean of the two weights
    model = Model(det, meta={"holdout": [str(p) for p in paths[4:]]})
    pred = det.predict(paths[4:])
    model.thresholds = fit_thresholds(pred.scores, list(pred.maps), 0.9, 0.99)
    folder = model.save(tmp_path / "model")
    par = export_onnx(folder)["parity"]  # refuses to write beyond 1e-4 (scores: the planted patches are the hottest)
    assert par["images"] == "calibration images" and max(par["max_score_rel_diff"], par["max_map_rel_diff"]) <= 1e-4
    session = load_onnx_model(folder).detector.session
    x = np.stack([det.geometry.apply(read_image(p)) for p in paths[4:]])
    onnx_patch = session.run(["patch_scores"], {"image": x})[0]
    feats = np.concatenate([f for f, _ in det._embed(paths[4:], {})])
    dd, ii = det._knn().search(feats.reshape(-1, feats.shape[-1]), k=det._k())
    torch_patch = det.scorer(dd, ii).reshape(onnx_patch.shape)
    assert np.max(np.abs(onnx_patch - torch_patch)) <= 1e-4 * torch_patch.max()


def test_refusals_are_one_line(tmp_path):
    folder = _saved(tmp_path, "patchcore", dict(CNN, reweight_neighbors=3), calibrated=False)
    res = runner.invoke(app, ["export-onnx", str(folder)])
    assert res.exit_code == 4 and "reweight_neighbors" in res.output and len(res.output.strip().splitlines()) == 1
    doc = json.loads((folder / "model.json").read_text())
    doc["detector"] = "anomalib_checkpoint"
    (folder / "model.json").write_text(json.dumps(doc))
    res = runner.invoke(app, ["export-onnx", str(folder)])
    assert res.exit_code == 4 and "'anomalib_checkpoint' is not supported" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["export-onnx", str(folder), "--opset", "9"])
    assert res.exit_code == 4 and len(res.output.strip().splitlines()) == 1
    if "knn" in _CNN_FIELDS and "patchcore_faiss_exact" in SETTINGS:
        hnsw = _saved(tmp_path / "h", "patchcore", dict(CNN, knn={"kind": "hnsw"}), calibrated=False)
        res = runner.invoke(app, ["export-onnx", str(hnsw)])
        assert res.exit_code == 4 and "knn.kind 'hnsw'" in res.output and len(res.output.strip().splitlines()) == 1
    dino = _saved(tmp_path / "d", "anomalydino", dict(SETTINGS["anomalydino_cnn"][1], masking=True, mask_threshold=1.0), calibrated=False)
    res = runner.invoke(app, ["export-onnx", str(dino)])
    assert res.exit_code == 4 and "masking" in res.output


def test_whitelist_refuses_options_it_does_not_know():
    """Every parameter value must be listed as reproduced by the graph; an option added later is
    exported only at its default, so new options are refused until the graph supports them."""
    from pyimgano_core.deploy.support import unsupported
    from pyimgano_core.detectors.anomalydino import AnomalyDINO
    from pyimgano_core.detectors.patchcore import PatchCoreParams
    from pyimgano_core.detectors.softpatch import SoftPatchParams

    class Future(SoftPatchParams):  # an option added by a later session
        stride: int | None = None

    assert unsupported("softpatch", Future(**CNN)) is None
    assert "detector.params.stride=2 is an option the ONNX graph does not implement" in unsupported("softpatch", Future(**CNN, stride=2))
    assert unsupported("patchcore", PatchCoreParams(**CNN, reweight_neighbors=1)) is None  # b=1 is the plain max
    assert "reweight_neighbors 2" in unsupported("patchcore", PatchCoreParams(**CNN, reweight_neighbors=2))
    assert "aggregation median is not in the graph" in unsupported("patchcore", PatchCoreParams.model_construct(**dict(CNN, aggregation="median")))
    dino = dict(SETTINGS["anomalydino_cnn"][1], masking="reference", mask_threshold=1.0)
    assert unsupported("anomalydino", AnomalyDINO.Params(**dino, category="bottle")) is None  # the reference does not mask bottle
    assert "masking 'reference'" in unsupported("anomalydino", AnomalyDINO.Params(**dino, category="screw"))
    assert "'msflow' is not supported" in unsupported("msflow", None)


# ------------------------------------------------------------------ CLI and the torch-free path
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_cli")
    tree = make_mvtec_tree(tmp / "data", n_train=10, n_test_good=2)
    cfg = write_config(tmp / "c.yaml", tree, params=CNN, calibration={"holdout_fraction": 0.3})
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp / "runs"), "-q"])
    assert res.exit_code == 0, res.output
    model = tmp / "runs/t/widget/model"
    res = runner.invoke(app, ["export-onnx", str(model)])
    assert res.exit_code == 0 and "parity on 3 calibration images" in res.output, res.output
    return tmp, cfg, model, tree


def test_export_maps_runtime_onnx_matches_torch(fitted):
    tmp, cfg, model, tree = fitted
    rows = {}
    for rt in ("torch", "onnx"):
        res = runner.invoke(app, ["export-maps", str(cfg), "--model", str(model), "--runtime", rt, "--out", str(tmp / rt), "-q"])
        assert res.exit_code == 0, res.output
        rows[rt] = [json.loads(x) for x in (tmp / rt / "t/widget/maps/predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows["torch"]] == [r["path"] for r in rows["onnx"]] and len(rows["onnx"]) == 7
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert abs(a["score"] - b["score"]) <= 1e-4 * abs(a["score"]) and a["is_anomalous"] == b["is_anomalous"]
        ma, mb = (np.load(tmp / rt / "t/widget/maps" / r["files"]["map"]).astype(np.float32) for rt, r in (("torch", a), ("onnx", b)))
        assert np.abs(ma - mb).max() <= 1e-3 * np.abs(ma).max()  # float16 files: one rounding step
    res = runner.invoke(app, ["export-maps", str(cfg), "--runtime", "onnx", "--out", str(tmp / "x"), "-q"])
    assert res.exit_code == 2 and "needs --model" in res.output


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
"""


def test_onnx_runtime_never_imports_torch(fitted, tmp_path):
    _, _, model, tree = fitted
    probe = sorted((tree / "widget/test").rglob("*.png"))[0]
    expected = load_model(model).predict(probe)
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        from pathlib import Path
        from pyimgano_core.infer import load_model
        from pyimgano_core.engine import export_images
        from pyimgano_core.deploy.onnx_runtime import load_onnx_model
        r = load_model({str(model)!r}, runtime="onnx").predict({str(probe)!r})
        s = export_images(load_onnx_model({str(model)!r}), [Path({str(probe)!r})], Path({str(tmp_path / "exp")!r}))
        from pyimgano_cli.app import main
        sys.argv = ["pyimgano", "export-maps", "--runtime", "onnx", "--model", {str(model)!r}, "--input", {str(probe.parent)!r},
                    "--out", {str(tmp_path / "cli")!r}, "-q"]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        try:
            import torch  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        print(json.dumps({{"score": r.score, "anomalous": r.is_anomalous, "n": s["n_scored"], "blocked": blocked,
                          "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"] and out["torch_loaded"] == [] and out["n"] == 1
    assert abs(out["score"] - expected.score) <= 1e-4 * abs(expected.score) and out["anomalous"] == expected.is_anomalous
    rows = [json.loads(x) for x in (tmp_path / "cli/t/widget/export/predictions.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["path"] == str(probe))
    assert abs(first["score"] - expected.score) <= 1e-4 * abs(expected.score) and len(rows) == len(list(probe.parent.glob("*.png")))


def test_onnx_detector_reports_an_image_the_graph_cannot_take():
    """An input of another model-input size fails alone (on_error="report") and raises by default."""
    from pyimgano_core.deploy.onnx_runtime import OnnxDetector
    from pyimgano_core.errors import DataError
    from pyimgano_core.features.geometry import Geometry

    class Session:  # score = mean pixel, map = the first channel: enough to see which rows ran
        runs = 0

        def run(self, names, feeds):
            Session.runs += 1
            x = feeds["image"].astype(np.float32)
            return x.mean(axis=(1, 2, 3)), x[..., 0], None

    det = OnnxDetector(Session(), "patchcore", {}, Geometry(size=16, mode="shorter_side"), (16, 16), batch=8)
    ok, wide = np.full((32, 32, 3), 100, np.uint8), np.full((32, 64, 3), 50, np.uint8)
    pred = det.predict([ok, wide, ok], on_error="report")
    assert list(pred.errors) == [1] and "ONNX graph takes 16x16" in pred.errors[1] and Session.runs == 1
    np.testing.assert_allclose(pred.scores[[0, 2]], 100.0)
    assert np.isnan(pred.scores[1])
    assert np.isnan(pred.maps[1]).all() and pred.maps.shape == (3, 16, 16)
    with pytest.raises(DataError, match="ONNX graph takes 16x16"):
        det.predict([ok, wide])
