"""anomalib checkpoint wrapper: parity with anomalib's own raw predictions, and refusals.

The parity tests train a tiny PaDiM (random-init resnet18, 64x64 inputs) on a synthetic
MVTec-layout tree with anomalib itself, export it the way anomalib users do
(``engine.export(model, export_type="torch")``), and compare pyimgano's scores and maps with
anomalib's ``Engine.predict`` on the same files with anomalib's normalisation switched off.
They skip when the ``anomalib`` extra is not installed; the refusal tests run everywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pyimgano_core.detectors.anomalib_checkpoint import ALIASES, AnomalibCheckpoint, peek_pickled_class
from pyimgano_core.detectors.base import create_detector, get_detector_class, list_detectors
from pyimgano_core.errors import ConfigError, ModelError, OptionalDependencyError
from synth import make_mvtec_tree

# The synthetic tree's image size is not the model's, so the resize path is exercised.
IMG_HW = (80, 96)


# -- a tiny anomalib model, trained and exported once per module ---------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("anomalib", reason="anomalib extra not installed: pip install -e '.[anomalib]'")
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("anomalib")
    cat = make_mvtec_tree(base / "mvtec", "bottle", n_train=10, n_test_good=3, defects={"crack": 3}, size=IMG_HW) / "bottle"
    dm = MVTecAD(root=base / "mvtec", category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = Padim(
        backbone="resnet18",
        layers=["layer1", "layer2"],
        pre_trained=False,
        pre_processor=Padim.configure_pre_processor((64, 64)),
        evaluator=False,
        visualizer=False,
    )
    engine = Engine(default_root_dir=base / "run", max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=dm)
    pt = engine.export(model=model, export_type="torch", export_root=base / "export")
    ckpt = next((base / "run").rglob("*.ckpt"))

    # anomalib's own raw predictions: its reader, its pre-processing callback, its predict_step;
    # normalisation and thresholding off (after the export, which keeps them on).
    model.post_processor.enable_normalization = False
    model.post_processor.enable_thresholding = False
    paths = sorted((cat / "test").rglob("*.png"))
    ref = {}
    for folder in sorted({p.parent for p in paths}):
        for batch in engine.predict(model=model, data_path=folder, return_predictions=True):
            for path, s, m in zip(batch.image_path, batch.pred_score.reshape(-1), batch.anomaly_map):
                ref[Path(path)] = (float(s), m.reshape(m.shape[-2:]).numpy())
    assert sorted(ref) == paths
    return {
        "pt": Path(pt),
        "ckpt": ckpt,
        "paths": paths,
        "ref_scores": np.array([ref[p][0] for p in paths], np.float32),
        "ref_maps": np.stack([ref[p][1] for p in paths]).astype(np.float32),
    }


def _assert_matches(pred, t) -> None:
    n = len(t["paths"])
    assert pred.scores.dtype == np.float32 and pred.scores.shape == (n,)
    assert pred.maps.dtype == np.float32 and pred.maps.shape == (n, 64, 64)
    np.testing.assert_allclose(pred.scores, t["ref_scores"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(pred.maps, t["ref_maps"], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(pred.orig_hw, np.tile(IMG_HW, (n, 1)))
    np.testing.assert_allclose(pred.boxes, np.tile([0, 0, *IMG_HW], (n, 1)))


# -- parity --------------------------------------------------------------------------------
def test_torch_export_matches_anomalib_raw_predictions(trained):
    det = create_detector("anomalib_checkpoint", checkpoint=str(trained["pt"]), trust_checkpoint=True, device="cpu", batch_size=4)
    pred = det.fit([]).predict(trained["paths"])
    _assert_matches(pred, trained)
    assert det.model_class_ == "Padim"
    # Arrays and paths are the same input.
    arrays = [cv2.imread(str(p))[:, :, ::-1].copy() for p in trained["paths"]]
    np.testing.assert_array_equal(det.predict(arrays).scores, pred.scores)


def test_post_processing_is_bypassed(trained):
    """anomalib's full forward = its PostProcessor applied to exactly the values pyimgano returns."""
    from anomalib.data import InferenceBatch

    module = torch.load(trained["pt"], weights_only=False, map_location="cpu")["model"].eval()
    pp = module.post_processor
    assert pp.enable_normalization and not torch.isnan(pp.image_max)  # anomalib fitted its min-max stats
    # Images already at the model size: anomalib's export-time resize is then the identity.
    arrays = [cv2.resize(cv2.imread(str(p))[:, :, ::-1], (64, 64), interpolation=cv2.INTER_AREA) for p in trained["paths"]]
    with torch.no_grad():
        full = module(torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]))
    pred = create_detector("padim_anomalib", checkpoint=trained["pt"], trust_checkpoint=True, device="cpu").fit([]).predict(arrays)
    raw = InferenceBatch(pred_score=torch.from_numpy(pred.scores)[:, None], anomaly_map=torch.from_numpy(pred.maps)[:, None])
    with torch.no_grad():
        post = pp(raw)
    np.testing.assert_allclose(full.pred_score.reshape(-1).numpy(), post.pred_score.reshape(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(full.anomaly_map.reshape(pred.maps.shape).numpy(), post.anomaly_map.reshape(pred.maps.shape).numpy(), atol=1e-5)
    assert float(full.anomaly_map.max()) <= 1.0 and float(pred.maps.max()) > 1.0  # clamped vs raw


def test_lightning_ckpt_matches_without_unpickling(trained):
    # anomalib 2.7 checkpoints hold tensors and plain data only: no trust needed.
    det = create_detector("padim_anomalib", checkpoint=trained["ckpt"], device="cpu")
    _assert_matches(det.fit([]).predict(trained["paths"]), trained)


def test_saved_state_is_path_and_hash(trained, tmp_path):
    ck = tmp_path / "model.pt"
    shutil.copy(trained["pt"], ck)
    det = create_detector("padim_anomalib", checkpoint=ck, trust_checkpoint=True, device="cpu").fit([])
    arrays, extras = det.state()
    assert arrays == {}
    extras = json.loads(json.dumps(extras))
    assert extras["checkpoint"] == str(ck.resolve()) and len(extras["checkpoint_sha256"]) == 64
    again = get_detector_class("padim_anomalib")(checkpoint=ck, trust_checkpoint=True, device="cpu")
    again.load_state(arrays, extras)
    _assert_matches(again.predict(trained["paths"]), trained)
    with open(ck, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="changed since the model was saved"):
        get_detector_class("padim_anomalib")(checkpoint=ck, trust_checkpoint=True).load_state(arrays, extras)


# -- refusals --------------------------------------------------------------------------------
def test_model_mismatch_named_before_unpickling(trained):
    for trust in (False, True):
        with pytest.raises(ModelError, match="holds an anomalib Padim model, but patchcore_anomalib expects Patchcore"):
            create_detector("patchcore_anomalib", checkpoint=trained["pt"], trust_checkpoint=trust).fit([])
    with pytest.raises(ModelError, match="anomalib_checkpoint expects draem"):
        create_detector("anomalib_checkpoint", checkpoint=trained["pt"], model="draem").fit([])


def test_model_mismatch_lightning_ckpt(trained):
    with pytest.raises(ModelError, match=r"does not load as an anomalib Patchcore model") as err:
        create_detector("patchcore_anomalib", checkpoint=trained["ckpt"], device="cpu").fit([])
    assert str(trained["ckpt"]) in str(err.value) and "\n" not in str(err.value)


def test_ckpt_without_model_name_and_size_conflict(trained):
    with pytest.raises(ConfigError, match="does not record its model class"):
        create_detector("anomalib_checkpoint", checkpoint=trained["ckpt"]).fit([])
    with pytest.raises(ConfigError, match=r"image_size=128 but .* trained at \(64, 64\)"):
        create_detector("padim_anomalib", checkpoint=trained["ckpt"], image_size=128, device="cpu").fit([])


class _RunsCode:
    """Unpickling this creates a directory: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_untrusted_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    ck = tmp_path / "model.pt"
    torch.save({"model": _RunsCode(marker)}, ck)
    with pytest.raises(ConfigError) as err:
        create_detector("anomalib_checkpoint", checkpoint=ck).fit([])
    msg = str(err.value)
    assert "execute arbitrary code" in msg and "trust_checkpoint: true" in msg and "\n" not in msg
    assert not marker.exists()
    torch.load(ck, weights_only=False)  # the file really runs code when unpickled
    assert marker.is_dir()


def test_static_mismatch_needs_no_anomalib(tmp_path):
    ck = tmp_path / "linear.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, ck)
    assert peek_pickled_class(ck) == "Linear"
    with pytest.raises(ModelError, match="holds an anomalib Linear model, but padim_anomalib expects Padim"):
        create_detector("padim_anomalib", checkpoint=ck).fit([])


def test_wrong_path_and_type(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(ModelError, match=f"anomalib checkpoint not found: {missing}"):
        create_detector("dinomaly_anomalib", checkpoint=missing).fit([])
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported type '.onnx'"):
        create_detector("anomalib_checkpoint", checkpoint=onnx).fit([])
    with pytest.raises(ConfigError, match="runs Padim checkpoints"):
        create_detector("padim_anomalib", checkpoint=onnx, model="patchcore").fit([])


def test_missing_extra_names_it(tmp_path, monkeypatch):
    ck = tmp_path / "model.ckpt"
    ck.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "anomalib", None)  # import anomalib -> ImportError
    with pytest.raises(OptionalDependencyError, match=r'pip install "pyimgano\[anomalib\]"'):
        create_detector("padim_anomalib", checkpoint=ck).fit([])


def test_aliases_registered():
    assert set(list_detectors("*_anomalib")) == set(ALIASES)
    for name, cls_name in ALIASES.items():
        cls = get_detector_class(name)
        assert issubclass(cls, AnomalibCheckpoint) and cls.anomalib_model == cls_name
    try:
        import anomalib.models as am
    except ImportError:
        return
    assert set(ALIASES.values()) <= set(am.__all__)


def test_import_pyimgano_core_does_not_import_anomalib():
    code = (
        "import sys, pyimgano_core, pyimgano_core.detectors, pyimgano_core.detectors.anomalib_checkpoint\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('anomalib', 'lightning', 'pytorch_lightning'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
