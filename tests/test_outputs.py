"""Outputs: unique names per input, one writer per folder, checked before work, strict JSON,
permissions from the umask."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pyimgano_core.outputs.files import folder_lock, temp_path
from pyimgano_core.outputs.files import write_json, write_jsonl
from tests.helpers import assert_one_line as _one_line, run_cli as run, small_mvtec_tree, write_config

@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return small_mvtec_tree(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tree, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("m")
    cfg = write_config(work / "c.yaml", tree, calibration={"holdout_fraction": 0.34})
    assert run("fit", cfg, "--out", work, "-q").exit_code == 0
    return work / "t/widget/model"


def test_same_stem_different_extension_and_subfolder_get_their_own_outputs(model, tree, tmp_path):
    good = cv2.imread(str(sorted((tree / "widget/test/good").glob("*.png"))[0]))
    bad = cv2.imread(str(sorted((tree / "widget/test/scratch").glob("*.png"))[0]))
    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    cv2.imwrite(str(inbox / "000.png"), bad)
    cv2.imwrite(str(inbox / "000.jpg"), good, [cv2.IMWRITE_JPEG_QUALITY, 100])
    cv2.imwrite(str(inbox / "sub/000.png"), good)
    res = run("export-maps", "--model", model, "--input", inbox, "--out", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    out = Path(json.loads(res.stdout)["categories"]["widget"]["out_dir"])
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    files = [r["files"]["map"] for r in rows]
    assert len(rows) == 3 and len(set(files)) == 3
    maps = {Path(r["path"]).relative_to(inbox).as_posix(): np.load(r["files"]["map"]) for r in rows}
    assert set(maps) == {"000.png", "000.jpg", "sub/000.png"}
    assert (out / "000.png_map.npy").is_file() and (out / "000.jpg_map.npy").is_file() and (out / "sub/000.png_map.npy").is_file()
    assert maps["000.png"].max() > maps["000.jpg"].max()  # the defective part's map was not replaced by the good one's


def test_second_writer_into_one_folder_is_refused_in_one_line(model, tree, tmp_path):
    out = tmp_path / "o/t/widget/export"
    with folder_lock(out, "export-maps"):  # another run is writing here
        res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "being written by another run" in res.output and f"pid {os.getpid()}" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 0, res.output  # the lock is released with its holder
    assert temp_path(out / "predictions.jsonl") != temp_path(out / "predictions.jsonl")
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_unusable_output_locations_fail_before_any_work(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(run("fit", cfg, "--out", afile), 2, "is a file")
    (tmp_path / "o/t").mkdir(parents=True)
    (tmp_path / "o/t/widget").write_text("x")  # <out>/<name>/<cat> is a file
    _one_line(run("eval", cfg, "--out", tmp_path / "o"), 2, "widget", "is a file")
    if sys.platform.startswith("linux"):  # a folder nobody may write (also for root): /proc
        _one_line(run("eval", cfg, "--out", "/proc/pyimgano-test"), 2, "Cannot write")
    assert not list(tmp_path.rglob("report.json"))


@pytest.mark.parametrize("setting,needle", [
    ("postprocess.blur_sigma=inf", "postprocess.blur_sigma: Input should be a finite number"),
    ("detector.params.blur_sigma=inf", "detector.params.blur_sigma"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("detector.params.image_size=100000", "detector.params.image_size: must be between 1 and 8192"),
    ("detector.params.crop=[0, 3]", "detector.params.crop"),
])
def test_out_of_range_numbers_are_config_errors(tree, tmp_path, setting, needle):
    cfg = write_config(tmp_path / "c.yaml", tree)
    _one_line(run("validate", cfg, "--set", setting), 2, needle)


def test_non_utf8_and_folder_configs(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _one_line(run("validate", p), 2, "not UTF-8", "0xe9")
    _one_line(run("validate", tmp_path), 2, "is a folder")


def test_json_outputs_are_strict(tmp_path):
    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.array([np.nan, 2.0])})
    write_jsonl(tmp_path / "p.jsonl", [{"score": float("nan")}, {"score": np.float64(0.25)}])

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))

    assert strict((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, 1.5], "c": [None, 2.0]}
    assert [strict(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [{"score": None}, {"score": 0.25}]


def test_outputs_honour_the_umask(model, tree, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 0, res.output
    paths = [p for p in [model, *model.rglob("*"), *(tmp_path / "o").rglob("*")] if not p.name.startswith(".pyimgano.lock")]
    modes = {p.relative_to(p.anchor).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    want = {p.relative_to(p.anchor).as_posix(): (0o777 if p.is_dir() else 0o666) & ~mask for p in paths}
    assert modes == want
    assert any(p.name == "predictions.jsonl" for p in paths) and any(p.name == "model.json" for p in paths)


def test_sigterm_during_export_and_save_leaves_no_temp_files(model, tree, tmp_path, monkeypatch):
    import signal

    import pyimgano_core.model as model_mod
    import pyimgano_core.outputs.predictions as engine  # the export writer (save_map_outputs) lives there

    calls = []

    def killed(*a, **k):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the service manager stops us mid-write
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(engine, "save_map_outputs", killed)
        res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "o")
        assert res.exit_code == 143 and "terminated" in res.output and "Traceback" not in res.output, res.output
        out = tmp_path / "o/t/widget/export"
        assert calls and not [p for p in out.iterdir() if p.name.startswith(".predictions")]
        monkeypatch.setattr(model_mod, "save_backbone", killed)
        cfg = write_config(tmp_path / "c.yaml", tree)
        res = run("fit", cfg, "--out", tmp_path / "f", "-q")
        assert res.exit_code == 143, res.output
        assert not list((tmp_path / "f/t/widget").glob(".model*"))
    finally:
        signal.signal(signal.SIGTERM, before)


def test_image_smaller_than_the_patch_grid_is_refused_naming_the_file(model, tree, tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    cv2.imwrite(str(inbox / "dot.png"), np.full((1, 1, 3), 200, np.uint8))
    cv2.imwrite(str(inbox / "ok.png"), cv2.imread(str(sorted((tree / "widget/test/good").glob("*.png"))[0])))
    res = run("export-maps", "--model", model, "--input", inbox, "--out", tmp_path / "o")
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert "dot.png is 1x1 px, smaller than the model's" in " ".join(res.output.split())
    assert "1/2 images scored" in res.output
