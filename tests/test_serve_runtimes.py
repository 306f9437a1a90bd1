"""Runtimes for the server: OpenVINO next to onnxruntime (parity with torch), the int8 gate
(refusal in one line, a kept graph loads on both engines, a changed one is refused), and the
one-line errors of `pyimgano serve` and of commands that need torch where it is missing."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from pyimgano_core.deploy import quantize as Q  # noqa: E402
from pyimgano_core.deploy.onnx_export import export_onnx  # noqa: E402
from pyimgano_core.errors import ConfigError, ModelError  # noqa: E402
from pyimgano_core.infer import load_model  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.serve_helpers import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtimes")
    model, good, bad = tiny_model(tmp)
    export_onnx(model)
    return tmp, model, good, bad


def test_openvino_runtime_matches_torch(exported):
    pytest.importorskip("openvino")
    tmp, model, good, bad = exported
    ref, ov = load_model(model), load_model(model, runtime="openvino")
    for path in (good, bad):
        a, b = ref.predict(path), ov.predict(path)
        assert abs(a.score - b.score) <= 1e-4 * abs(a.score) and a.is_anomalous == b.is_anomalous
        assert np.nanmax(np.abs(a.anomaly_map - b.anomaly_map)) <= 1e-4 * np.nanmax(np.abs(a.anomaly_map))
        np.testing.assert_array_equal(a.mask, b.mask)


def test_unknown_runtime_and_missing_graphs_are_one_line(exported, tmp_path):
    tmp, model, good, bad = exported
    with pytest.raises(ConfigError, match="runtime must be one of torch, onnx, openvino, onnx-int8, openvino-int8; got 'tensorrt'"):
        load_model(model, runtime="tensorrt")
    with pytest.raises(ModelError, match="no int8 graph recorded in model.json; run: pyimgano quantize"):
        load_model(model, runtime="onnx-int8")
    plain, _, _ = tiny_model(tmp_path, category="plain")
    res = run_cli("serve", "--model", plain, "--runtime", "onnx")
    assert res.exit_code == 4 and f"--runtime onnx needs the graph from 'pyimgano export-onnx {plain}'" in res.output
    res = run_cli("serve", "--model", tmp_path / "nothing")
    assert res.exit_code == 4 and "Not a pyimgano model folder (no model.json)" in res.output
    res = run_cli("serve", "--model", model, "--model", model)
    assert res.exit_code == 2 and "two models named 'widget'" in res.output and "--model NAME=DIR" in res.output
    (tmp_path / "empty_token").write_text("\n")
    res = run_cli("serve", "--model", model, "--token-file", tmp_path / "empty_token")
    assert res.exit_code == 2 and "the file must hold one token (no spaces), got nothing" in res.output
    res = run_cli("serve", "--model", model, "--runtime", "jit")
    assert res.exit_code == 2 and "--runtime must be one of torch, onnx" in res.output and "Traceback" not in res.output


def test_int8_gate_refuses_in_one_line_and_writes_nothing(exported):
    tmp, model, good, bad = exported
    before = (model / "model.json").read_text()
    res = run_cli("quantize", model)  # random backbone weights: int8 moves the tiny scores far
    assert res.exit_code == 4, res.output
    assert "the int8 graph differs from float32 beyond the tolerance (scores 0.05, maps 0.1, relative; no decision flips)" in res.output
    assert "nothing written" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (model / "model.int8.onnx").exists() and (model / "model.json").read_text() == before


def test_a_kept_int8_graph_runs_on_both_engines_and_a_changed_one_is_refused(exported, monkeypatch):
    tmp, model, good, bad = exported
    monkeypatch.setattr(Q, "INT8_SCORE_RTOL", float("inf"))  # keep it whatever it scores: this test is about the files
    monkeypatch.setattr(Q, "INT8_MAP_RTOL", float("inf"))
    real = Q.compare
    monkeypatch.setattr(Q, "compare", lambda a, b, images: {**real(a, b, images), "decision_flips": 0})
    section = Q.quantize_int8(model)
    doc = json.loads((model / "model.json").read_text())
    assert doc["int8"]["sha256"] == section["sha256"] and (model / "model.int8.onnx").is_file()
    assert section["calibration_images"] == 4 and "backbone Conv nodes" in section["method"]
    import onnx

    graph = onnx.load(str(model / "model.int8.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 0 and "Conv" in ops
    # the blur after upsampling stays float: no DequantizeLinear feeds it
    dq_out = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    assert all(not (set(n.input) & dq_out) for n in graph.graph.node if n.name.startswith("/blur/"))
    runtimes = ("onnx-int8", "openvino-int8") if importlib.util.find_spec("openvino") else ("onnx-int8",)
    for rt in runtimes:  # the kept file loads (sha256 checked) and scores on each engine
        r = load_model(model, runtime=rt).predict(bad)
        assert np.isfinite(r.score) and r.anomaly_map.shape == (60, 52)
    data = (model / "model.int8.onnx").read_bytes()
    (model / "model.int8.onnx").write_bytes(data + b"\0")
    with pytest.raises(ModelError, match="does not match .* recorded in model.json: the graph was changed after it was written"):
        load_model(model, runtime="onnx-int8")


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from pyimgano_cli.app import main
sys.argv = ["pyimgano"] + sys.argv[1:]
main()
"""


def test_commands_that_need_torch_say_which_extra_in_one_line(exported):
    tmp, model, good, bad = exported
    for args in (["fit", str(ROOT / "configs/mvtec_patchcore_mobilenet.yaml")], ["serve", "--model", str(model)]):
        proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=tmp, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 5, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and 'pip install "pyimgano[torch]"' in lines[0] and "Traceback" not in proc.stderr, proc.stderr
