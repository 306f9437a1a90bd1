"""Disk-backed training-feature store: round trip, cleanup on every exit path, resource errors."""
from __future__ import annotations

import builtins
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pyimgano_core.features.store as store_mod
from pyimgano_cli.app import app
from pyimgano_core.detectors.patchcore import PatchCore
from pyimgano_core.errors import ResourceError
from pyimgano_core.features.store import FeatureStore
from tests.helpers import PixelEmbedder, write_config
from tests.synth import make_mvtec_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_mvtec_tree(tmp_path_factory.mktemp("data"), n_train=6, n_test_good=2)


def test_round_trip_slices_and_gathers(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (7, 0, 40000, 3)]
    full = np.concatenate(parts)
    with FeatureStore(tmp_path) as st:
        for p in parts:
            st.append(p)
        assert st.shape == (len(full), 5) and st.folder.parent == tmp_path
        np.testing.assert_array_equal(st[:], full)
        np.testing.assert_array_equal(st[16380:16390], full[16380:16390])  # across a read chunk
        idx = rng.permutation(len(full))[:5000]
        np.testing.assert_array_equal(st[idx], full[idx])  # any order, several chunks
        np.testing.assert_array_equal(st[np.array([3, 3, 0])], full[[3, 3, 0]])
        with pytest.raises(IndexError):
            st[np.array([len(full)])]
        folder = st.folder
    assert not folder.exists() and st.removed and list(tmp_path.iterdir()) == []


def test_removed_on_error_and_on_ctrl_c(tmp_path):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with FeatureStore(tmp_path) as st:
                st.append(np.ones((10, 3)))
                raise exc
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_and_full_disk_give_resource_error(tmp_path, monkeypatch):
    with pytest.raises(ResourceError, match="spill_dir"):
        FeatureStore(tmp_path / "missing" / "deeper").__enter__()
    assert not (tmp_path / "missing").exists()
    # a real ENOSPC from the kernel: the spill file is /dev/full
    monkeypatch.setattr(store_mod, "open", lambda *a, **k: builtins.open("/dev/full", "wb", buffering=0), raising=False)
    with pytest.raises(ResourceError, match="No space left"):
        with FeatureStore(tmp_path) as st:
            st.append(np.ones((1000, 64)))
    assert list(tmp_path.iterdir()) == []


def test_sigterm_removes_the_folder(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from pyimgano_core.features.store import FeatureStore
        with FeatureStore({str(tmp_path)!r}) as st:
            st.append(np.ones((100, 8)))
            print(st.folder, flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert folder.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_fit_reports_spill_and_estimate_and_matches_in_memory_coreset(tmp_path):
    det = PatchCore(embedder=PixelEmbedder(), image_size=32, crop=None, coreset={"ratio": 0.25}, spill_dir=str(tmp_path))
    stages = []
    det.fit_progress = lambda stage, done, total: stages.append((stage.split(":")[0], done, total))
    det.fit(_images())
    spill = det.timing_["spill"]
    assert spill["rows"] == 6 * 64 and spill["dim"] == 27 and spill["removed"] and Path(spill["folder"]).parent == tmp_path
    est = det.timing_["estimate"]
    assert est["patches"] == 384 and est["memory_bank_bytes"] == 96 * 27 * 4
    assert list(tmp_path.iterdir()) == []
    assert ("features", 6, 6) in stages and stages[-1] == ("coreset", 96, 96)
    # same memory as the coreset of the in-RAM features
    from pyimgano_core.detectors.patchknn.greedy import greedy_coreset

    feats = np.concatenate([f for f, _ in det._embed(_images(), {})]).reshape(-1, 27)
    np.testing.assert_array_equal(det.memory_, feats[np.sort(greedy_coreset(feats, 96, 128, 0))])


def test_memory_limit_stops_before_the_work_naming_the_knobs(tmp_path):
    det = PatchCore(embedder=PixelEmbedder(), image_size=32, crop=None, max_memory_gb=0.001, spill_dir=str(tmp_path))
    with pytest.raises(ResourceError, match=r"coreset\.ratio, image_size.*layer"):
        det.fit(_images())
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_coreset_leaves_nothing_and_rerun_works(tmp_path):
    det = PatchCore(embedder=PixelEmbedder(), image_size=32, crop=None, coreset={"ratio": 0.5}, spill_dir=str(tmp_path))

    def interrupt(stage, done, total):
        if stage.startswith("coreset") and done > 0:
            raise KeyboardInterrupt

    det.fit_progress = interrupt
    with pytest.raises(KeyboardInterrupt):
        det.fit(_images())
    assert list(tmp_path.iterdir()) == []
    det.fit_progress = None
    assert det.fit(_images()).memory_.shape == (192, 27)


def test_cli_one_line_and_exit_code_for_unwritable_spill_dir_and_limit(tree, tmp_path):
    runner = CliRunner()
    for params, needle in (({"spill_dir": str(tmp_path / "nope" / "x")}, "spill folder"),
                           ({"max_memory_gb": 0.01}, "max_memory_gb")):
        cfg = write_config(tmp_path / "c.yaml", tree, params={"backbone": "resnet18", "layers": ["layer1"], "weights": None,
                                                              "image_size": 32, "crop": None, "coreset": {"ratio": 0.5},
                                                              "pretrain_embed_dim": 16, "target_embed_dim": 16, **params})
        res = runner.invoke(app, ["eval", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
        assert res.exit_code == ResourceError.exit_code, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "nope").exists()
