"""A saved model folder is self-contained, movable, verified and validated on load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pyimgano_core.errors import ModelError
from pyimgano_core.model import Model
from tests.helpers import run_cli as run, small_mvtec_tree, TINY_CNN, write_config

@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return small_mvtec_tree(tmp_path_factory)


@pytest.fixture(scope="module")
def fitted(tree, tmp_path_factory):
    """A model fitted from a relative weights path (like ``../shared/weights/...``)."""
    work = tmp_path_factory.mktemp("work")
    (work / "weights").mkdir()
    torch.manual_seed(7)
    torch.save(torchvision.models.resnet18().state_dict(), work / "weights/r18.pth")
    cfg = write_config(work / "c.yaml", tree, params=dict(TINY_CNN, weights="weights/r18.pth"),
                       calibration={"holdout_fraction": 0.34})
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        assert run("fit", "c.yaml", "--out", "runs", "-q").exit_code == 0
        res = run("export-maps", "c.yaml", "--model", "runs/t", "--input", tree / "widget/test", "--out", "ref", "--json")
        assert res.exit_code == 0, res.output
    finally:
        mp.undo()
    return work, cfg


def _scores(folder: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    return {Path(r["path"]).relative_to(Path(r["path"]).parents[1]).as_posix(): r["score"] for r in rows}


def test_moved_model_folder_gives_identical_scores_without_weights_or_config(fitted, tree, tmp_path, monkeypatch):
    work, _ = fitted
    model_dir = work / "runs/t/widget/model"
    doc = json.loads((model_dir / "model.json").read_text())
    assert doc["params"]["weights"] == "weights/r18.pth"  # provenance kept ...
    assert doc["backbone"]["file"] == "backbone.pt" and len(doc["backbone"]["sha256"]) == 64  # ... tensors copied
    # only the tensors the taps use: resnet18 cut after layer2 (no layer3, layer4, fc)
    state = torch.load(model_dir / "backbone.pt", weights_only=True)
    assert not any(".layer3." in k or ".layer4." in k or ".fc." in k for k in state) and any(".layer2." in k for k in state)
    moved = tmp_path / "server/model"
    shutil.copytree(model_dir, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no weights/ here, no config: only the model folder
    res = run("export-maps", "--model", moved, "--input", tree / "widget/test", "--out", "out", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    out = Path(summary["categories"]["widget"]["out_dir"])
    assert out == Path("out/t/widget/export") and (Path("out/t") / "export_summary.json").is_file()
    assert _scores(out) == _scores(work / "ref/t/widget/export")  # identical, not merely close


def test_tampered_backbone_is_refused(fitted, tmp_path):
    work, _ = fitted
    moved = tmp_path / "m"
    shutil.copytree(work / "runs/t/widget/model", moved)
    with open(moved / "backbone.pt", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelError, match="sha256"):
        Model.load(moved)


def _corrupt(src: Path, dst: Path, memory: np.ndarray) -> Path:
    shutil.copytree(src, dst)
    with np.load(src / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["memory_"] = memory
    np.savez(dst / "arrays.npz", **arrays)
    return dst


@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_corrupt_memory_bank_is_refused_with_one_line(fitted, tree, tmp_path, kind):
    work, cfg = fitted
    src = work / "runs/t/widget/model"
    with np.load(src / "arrays.npz") as z:
        mem = z["memory_"]
    bad = np.full_like(mem, np.nan) if kind == "nan" else mem[:, :5]
    model = _corrupt(src, tmp_path / "bad", bad)
    res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "o")
    assert res.exit_code == 4, res.output
    assert ("NaN" in res.output) if kind == "nan" else ("target_embed_dim" in res.output)
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_fit_refuses_to_replace_a_foreign_folder_and_cleans_dead_temp_folders(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    cat = tmp_path / "o/t/widget"
    cat.mkdir(parents=True)
    (cat / "model").write_text("my notes")  # a file, not a model folder
    res = run("fit", cfg, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 4 and "Refusing to replace" in res.output and "Traceback" not in res.output
    assert (cat / "model").read_text() == "my notes" and not list(cat.glob(".model*"))
    (cat / "model").unlink()
    dead = cat / ".model.999999999.deadbeef"  # left by a save killed with SIGKILL (pid gone)
    dead.mkdir()
    (dead / "arrays.npz").write_bytes(b"half")
    assert run("fit", cfg, "--out", tmp_path / "o", "-q").exit_code == 0
    assert not dead.exists() and (cat / "model/model.json").is_file()
