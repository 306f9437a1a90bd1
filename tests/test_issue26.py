"""Issue 26 (first day on a line): each defect QA found, as a test that failed on 85eb923.

Small synthetic data and tiny models (no weights) so the whole file runs in well under a minute;
the real-data demonstrations are in the report of the issue.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pyimgano_core.outputs import folder_lock
from tests.helpers import run_cli as run, small_mvtec_tree, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return small_mvtec_tree(tmp_path_factory)


@pytest.fixture(scope="module")
def fitted(tree, tmp_path_factory) -> tuple[Path, Path]:
    """(config, model folder) of a calibrated tiny model."""
    work = tmp_path_factory.mktemp("m")
    cfg = write_config(work / "c.yaml", tree, calibration={"holdout_fraction": 0.34})
    res = run("fit", cfg, "--out", work, "-q")
    assert res.exit_code == 0, res.output
    return cfg, work / "t/widget/model"


def _one_line(res, code: int, *needles: str) -> str:
    text = res.output.strip()
    assert res.exit_code == code, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text
    return text


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ 5: export-onnx permissions
def test_export_onnx_files_honour_the_umask(tree, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    params = dict(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size=48, crop=None,
                  resize_mode="squash", coreset_ratio=0.5, pretrain_embed_dim=40, target_embed_dim=32)
    cfg = write_config(tmp_path / "c.yaml", tree, params=params, calibration={"holdout_fraction": 0.34})
    assert run("fit", cfg, "--out", tmp_path, "-q").exit_code == 0
    folder = tmp_path / "t/widget/model"
    res = run("export-onnx", folder)
    assert res.exit_code == 0, res.output
    want = 0o666 & ~_umask()
    assert {p: stat.S_IMODE((folder / p).stat().st_mode) for p in ("model.json", "model.onnx")} == \
           {"model.json": want, "model.onnx": want}


# ------------------------------------------------------------------ 6: fit takes the writer lock
def test_second_fit_into_one_out_is_refused_in_one_line(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    with folder_lock(tmp_path / "o" / "t", "fit"):  # another fit is writing this run folder
        res = run("fit", cfg, "--out", tmp_path / "o", "-q")
    _one_line(res, 2, "being written by another run", f"pid {os.getpid()}, fit")
    assert not (tmp_path / "o/t/widget/model").exists()


# ------------------------------------------------------------------ 13: no lock files left behind
def test_no_lock_files_after_successful_runs(fitted, tree, tmp_path):
    cfg, model = fitted
    assert run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "x", "-q").exit_code == 0
    assert run("eval", cfg, "--model", model, "--out", tmp_path / "e", "-q").exit_code == 0
    locks = [p for root in (model.parent.parent, tmp_path) for p in root.rglob(".pyimgano.lock")]
    assert locks == []


def test_lock_is_released_and_taken_again(tmp_path):
    for _ in range(2):
        with folder_lock(tmp_path, "x"):
            assert (tmp_path / ".pyimgano.lock").read_text() == f"pid {os.getpid()}, x"
        assert not (tmp_path / ".pyimgano.lock").exists()
