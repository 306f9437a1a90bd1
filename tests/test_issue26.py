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

from pyimgano_core.outputs.files import folder_lock
from tests.helpers import assert_one_line as _one_line, run_cli as run, small_mvtec_tree, write_config

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ 5: export-onnx permissions
def test_export_onnx_files_honour_the_umask(tree, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    params = dict(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size=48, crop=None,
                  resize_mode="squash", coreset={"ratio": 0.5}, pretrain_embed_dim=40, target_embed_dim=32)
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


# ------------------------------------------------------------------ 1: earlier exports are never lost
def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


def _files_agree(folder: Path) -> None:
    """predictions.jsonl lists exactly the overlays present, and summary.json counts it."""
    rows = _rows(folder)
    overlays = sorted(str(p) for p in folder.rglob("*_overlay.png"))
    assert sorted(r["files"]["overlay"] for r in rows) == overlays
    assert json.loads((folder / "summary.json").read_text())["n_predictions"] == len(rows)


def test_failed_export_into_the_same_folder_changes_nothing(fitted, tree, tmp_path):
    _, model = fitted
    out = tmp_path / "X"
    res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    folder = Path(json.loads(res.output)["categories"]["widget"]["out_dir"])
    before = {p: p.read_bytes() for p in folder.parent.parent.rglob("*") if p.is_file()}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part.png").write_text("not an image")
    res = run("export-maps", "--model", model, "--input", bad, "--out", out)
    assert res.exit_code == 3
    assert "none of the 1 image(s) could be read; nothing was exported" in res.output and "all others" not in res.output
    after = {p: p.read_bytes() for p in folder.parent.parent.rglob("*") if p.is_file()}
    assert after == before  # predictions.jsonl, summary.json, export_summary.json, every overlay: byte for byte
    _files_agree(folder)


def test_second_export_adds_per_input_and_replaces_the_same_input(fitted, tree, tmp_path):
    _, model = fitted
    out = tmp_path / "X"
    good, scratch = tree / "widget/test/good", tmp_path / "scratch"
    scratch.mkdir()
    for f in sorted((tree / "widget/test/scratch").glob("*.png")):  # other names: the same name replaces (below)
        (scratch / f"s_{f.name}").write_bytes(f.read_bytes())
    assert run("export-maps", "--model", model, "--input", good, "--out", out, "-q").exit_code == 0
    folder = out / "t/widget/export"
    first = {r["path"]: r["score"] for r in _rows(folder)}
    assert run("export-maps", "--model", model, "--input", scratch, "--out", out, "-q").exit_code == 0
    second = {r["path"]: r["score"] for r in _rows(folder)}
    assert {k: second[k] for k in first} == first and len(second) == len(first) + len(list(scratch.glob("*.png")))
    _files_agree(folder)
    assert run("export-maps", "--model", model, "--input", good, "--out", out, "-q").exit_code == 0  # the same inputs again
    third = _rows(folder)
    assert len(third) == len(second) and {r["path"]: r["score"] for r in third} == second  # replaced, not duplicated
    _files_agree(folder)


def test_export_of_another_model_into_the_folder_is_refused(fitted, tree, tmp_path):
    cfg, model = fitted
    out = tmp_path / "X"
    assert run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", out, "-q").exit_code == 0
    before = (out / "t/widget/export/predictions.jsonl").read_bytes()
    other = write_config(tmp_path / "c.yaml", tree, calibration={"holdout_fraction": 0.5})
    assert run("fit", other, "--out", tmp_path / "m2", "-q").exit_code == 0
    res = run("export-maps", "--model", tmp_path / "m2/t/widget/model", "--input", tree / "widget/test/good", "--out", out)
    _one_line(res, 2, "another model")
    assert (out / "t/widget/export/predictions.jsonl").read_bytes() == before


# ------------------------------------------------------------------ 2: --out inside --input
def test_out_inside_input_is_refused_in_one_line(fitted, tree, tmp_path):
    _, model = fitted
    inbox = tmp_path / "in"
    inbox.mkdir()
    for p in sorted((tree / "widget/test/good").glob("*.png")):
        (inbox / p.name).write_bytes(p.read_bytes())
    before = sorted(inbox.rglob("*"))
    res = run("export-maps", "--model", model, "--input", inbox, "--out", inbox / "results")
    _one_line(res, 2, "inside --input")
    assert sorted(inbox.rglob("*")) == before


# ------------------------------------------------------------------ 9: messages and codes
def test_a_file_as_input_says_it_must_be_a_folder(fitted, tree):
    _, model = fitted
    image = sorted((tree / "widget/test/good").glob("*.png"))[0]
    text = _one_line(run("export-maps", "--model", model, "--input", image), 3, "must be a folder")
    assert "not found" not in text


def test_some_failed_images_are_counted_honestly(fitted, tree, tmp_path):
    _, model = fitted
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(sorted((tree / "widget/test/good").glob("*.png"))[0].read_bytes())
    (inbox / "b.png").write_text("not an image")
    res = run("export-maps", "--model", model, "--input", inbox, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 3 and "1 of 2 image(s) could not be read; the other 1 were exported" in res.output


# ------------------------------------------------------------------ 3: channel order of arrays
def test_predict_array_needs_its_channel_order(fitted, tree):
    from pyimgano_core.errors import ConfigError
    from pyimgano_core.infer import load_model

    _, model = fitted
    inspector = load_model(model)
    path = sorted((tree / "widget/test/scratch").glob("*.png"))[0]
    bgr = cv2.imread(str(path))
    with pytest.raises(ConfigError, match="channels='rgb' or channels='bgr'"):
        inspector.predict(bgr)
    want = inspector.predict(path)
    got_bgr = inspector.predict(bgr, channels="bgr")
    got_rgb = inspector.predict(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), channels="rgb")
    assert got_bgr.score == want.score == got_rgb.score
    np.testing.assert_array_equal(got_bgr.anomaly_map, want.anomaly_map)
    assert inspector.predict(str(path), channels="bgr").score == want.score  # paths: channels play no part


# ------------------------------------------------------------------ 4: model.json schema and sha256
def _copy_model(model: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model, dest))


@pytest.mark.parametrize("value", ['"high"', "-1e9", "NaN", "Infinity", "null"])
def test_hand_edited_threshold_is_one_line_exit_4_before_any_work(fitted, tree, tmp_path, value):
    _, model = fitted
    folder = _copy_model(model, tmp_path / "model")
    doc = json.loads((folder / "model.json").read_text())
    doc.pop("model_json_sha256", None)  # even a folder without the hash (written by 85eb923) is validated
    text = json.dumps(doc, indent=2).replace(f'"image": {json.dumps(doc["thresholds"]["image"])}', f'"image": {value}', 1)
    assert text != json.dumps(doc, indent=2)
    (folder / "model.json").write_text(text)
    res = run("export-maps", "--model", folder, "--input", tree / "widget/test/good", "--out", tmp_path / "o")
    _one_line(res, 4, "model.json", "thresholds.image" if value != "NaN" and value != "Infinity" else "not a number JSON allows")
    assert not (tmp_path / "o").exists() and list(folder.glob(".pyimgano.lock")) == []


def test_model_json_records_its_sha256_and_an_edit_is_refused(fitted, tree, tmp_path):
    from pyimgano_core.model import Model
    from pyimgano_core.model_doc import doc_sha256

    _, model = fitted
    folder = _copy_model(model, tmp_path / "model")
    doc = json.loads((folder / "model.json").read_text())
    assert doc["model_json_sha256"] == doc_sha256(doc)
    doc["thresholds"]["image"] = 1.0  # a valid value, but not the one fitted
    (folder / "model.json").write_text(json.dumps(doc, indent=2))
    res = run("export-maps", "--model", folder, "--input", tree / "widget/test/good", "--out", tmp_path / "o")
    _one_line(res, 4, "does not match", "edited")
    del doc["model_json_sha256"]  # as written by 85eb923: no hash, validated and accepted
    (folder / "model.json").write_text(json.dumps(doc, indent=2))
    assert Model.load(folder).thresholds.image == 1.0


def test_folder_written_by_85eb923_still_loads(tmp_path):
    """model.json as the old code wrote it (no model_json_sha256), checked against the schema."""
    from pyimgano_core.model_doc import check_doc

    doc = json.loads((ROOT / "tests/data/model_json_85eb923.json").read_text())
    assert "model_json_sha256" not in doc
    assert check_doc(doc, tmp_path / "model.json") is doc


# ------------------------------------------------------------------ 7: eval --model compares tensors, not path strings
def test_eval_model_accepts_another_spelling_of_the_same_weights(tree, tmp_path, monkeypatch):
    import torch
    import torchvision

    from tests.helpers import TINY_CNN

    (tmp_path / "w").mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "w/r18.pth")
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "w/other.pth")
    monkeypatch.chdir(tmp_path)
    fit_cfg = write_config(tmp_path / "a.yaml", tree, params=dict(TINY_CNN, weights=str(tmp_path / "w/r18.pth")))
    assert run("fit", fit_cfg, "--out", tmp_path / "m", "-q").exit_code == 0
    same = write_config(tmp_path / "b.yaml", tree, params=dict(TINY_CNN, weights="w/../w/r18.pth"))
    res = run("eval", same, "--model", tmp_path / "m/t", "--out", tmp_path / "e", "--json")
    assert res.exit_code == 0, res.output
    other = write_config(tmp_path / "c.yaml", tree, params=dict(TINY_CNN, weights="w/other.pth"))
    _one_line(run("eval", other, "--model", tmp_path / "m/t", "--out", tmp_path / "e2"), 4, "weights=")


# ------------------------------------------------------------------ 8: geometry and taps at validation
@pytest.mark.parametrize("setting,needles", [
    ("image_size=7", ["detector.params.image_size=7", "1x1 patch grid", "image_size >= 12"]),
    ("image_size=[64,20]", ["ok"]),
    ("image_size=[20,64]", ["ok"]),
    ("image_size=[64,8]", ["detector.params.image_size=[64, 8]", "16x2 patch grid"]),
    ("crop=8", ["detector.params.crop=8", "2x2 patch grid"]),
    ("layers=[nope]", ["detector.params.layers", "'nope' not found"]),
    ("layers=[layer2,layer1]", ["detector.params.layers", "shallowest first"]),
    ("layers=[fc]", ["detector.params.layers", "'fc' gives no feature map"]),
    ("layers=[layer1,layer1]", ["detector.params.layers", "twice"]),
])
def test_unusable_geometry_or_taps_fail_validation_naming_the_field(tree, tmp_path, setting, needles):
    from tests.helpers import TINY_CNN

    cfg = write_config(tmp_path / "c.yaml", tree, params=dict(TINY_CNN, crop=None))  # layer1: stride 4
    res = run("validate", cfg, "--set", f"detector.params.{setting}")
    if "ok" in needles:  # a 5-patch side is fine
        assert res.exit_code == 0, res.output
        return
    _one_line(res, 2, *needles)


def test_smallest_usable_grid_validates(tree, tmp_path):
    from tests.helpers import TINY_CNN

    cfg = write_config(tmp_path / "c.yaml", tree, params=dict(TINY_CNN, crop=None))
    assert run("validate", cfg, "--set", "detector.params.image_size=12").exit_code == 0  # 3x3 at stride 4
    _one_line(run("validate", cfg, "--set", "detector.params.image_size=11"), 2, "2x2 patch grid")


# ------------------------------------------------------------------ 9: more messages and codes
def test_empty_out_is_refused_not_the_current_folder(fitted, tree, tmp_path, monkeypatch):
    cfg, model = fitted
    monkeypatch.chdir(tmp_path)
    _one_line(run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", ""), 2, "--out is empty")
    _one_line(run("fit", cfg, "--out", "", "-q"), 2, "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_text_file_as_weights_never_suggests_weights_only_false(tree, tmp_path):
    from tests.helpers import TINY_CNN

    (tmp_path / "w.pth").write_text("this is a text file, not a checkpoint\n" * 5)
    cfg = write_config(tmp_path / "c.yaml", tree, params=dict(TINY_CNN, weights=str(tmp_path / "w.pth")))
    text = _one_line(run("fit", cfg, "--out", tmp_path / "o", "-q"), 4, "not a checkpoint of plain tensors")
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


def test_quiet_still_prints_the_holdout_warning(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree, calibration={"holdout_fraction": 0.34})
    res = run("fit", cfg, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 0 and "calibration holdout has 2 image(s)" in res.output


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_exit_7_and_keeps_the_earlier_report(fitted, small_disk):
    cfg, model = fitted
    assert run("eval", cfg, "--model", model, "--out", small_disk, "-q").exit_code == 0
    cat = small_disk / "t/widget"
    before = {p: p.read_bytes() for p in (cat / "report_assets").iterdir()}
    assert before
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 48 * 1024))  # 48 KiB left
    res = run("eval", cfg, "--model", model, "--out", small_disk, "-q")
    _one_line(res, 7, "no space left")
    assert {p: p.read_bytes() for p in (cat / "report_assets").iterdir()} == before
    assert [p.name for p in cat.iterdir() if p.name.startswith(".report_assets")] == []


# ------------------------------------------------------------------ 10: start-up
_PROBE = """
import runpy, sys
sys.argv = ["pyimgano", *sys.argv[1:]]
try:
    runpy.run_module("pyimgano_cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "torchvision", "cv2", "sklearn", "scipy", "pyimgano_core.engine", "pyimgano_core.detectors")
               if m in sys.modules)
print("HEAVY", ",".join(heavy), "EXIT", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args,code,heavy_ok", [
    (["--help"], 0, set()),
    (["validate", "nope.yaml"], 2, set()),
    (["fit", "nope.yaml"], 2, set()),
    (["export-maps", "--model", "m", "--input", "i", "--out", ""], 2, set()),
    (["validate", "TYPO"], 2, {"cv2"}),  # schema error: the dataset models (cv2 for images), never torch
])
def test_help_and_config_errors_import_no_torch(tmp_path, args, code, heavy_ok):
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\ndataset: {type: mvtec_ad, root: r, category: bottle}\ndetector: {name: patchcore}\ntypo_key: 1\n")
    args = [str(typo) if a == "TYPO" else a for a in args]
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = [x for x in res.stderr.splitlines() if x.startswith("HEAVY")][-1]
    heavy = set(filter(None, line.split()[1].split(","))) if line.split()[1] != "EXIT" else set()
    assert line.endswith(f"EXIT {code}"), res.stderr
    assert heavy <= heavy_ok, line


# ------------------------------------------------------------------ 11: progress and tables at 80 columns
def _console80():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)


def test_fit_progress_has_totals_rates_and_eta_uncut_at_80_columns(tree, tmp_path):
    from pyimgano_cli.progress import RichProgress
    from pyimgano_core.config import load_config
    from pyimgano_core.runs import fit_run

    console = _console80()
    cfg = load_config(write_config(tmp_path / "c.yaml", tree))
    fit_run(cfg, tmp_path / "o", progress=RichProgress(console))
    text = console.file.getvalue()
    assert "/?" not in text and "…" not in text
    flat = " ".join(text.split())
    assert "[widget] patchcore: features:" in flat and "expected peak" in flat  # wrapped, not cut
    assert "6/6" in flat  # feature extraction over the 6 training images knows its total
    coreset = [line for line in text.splitlines() if "coreset:" in line]
    assert coreset and all("/s" in line and "eta" in line for line in coreset)
    done, total = (int(v.replace(",", "")) for v in coreset[0].split("━")[-1].split()[0].split("/"))
    assert done == total > 0


def test_results_table_keeps_defect_names_whole_at_80_columns():
    from pyimgano_cli.common import results_table

    metrics = {k: 0.5 for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")}
    summary = {"name": "mvtec_patchcore_mobilenet", "detector": "patchcore", "mean": metrics,
               "categories": {"bottle": {"metrics": metrics, "timing": {"fit_s": 24.1, "predict_s_per_image": 0.31},
                                         "per_defect": {"broken_large": dict(metrics, n=20), "contamination": dict(metrics, n=21)}}}}
    console = _console80()
    console.print(results_table(summary))
    lines = console.file.getvalue().splitlines()
    assert max(len(x) for x in lines) <= 80
    assert any("broken_large (20)" in x for x in lines) and any("contamination (21)" in x for x in lines)


# ------------------------------------------------------------------ 12: honest pictures
def test_report_thumbnails_use_the_models_scale_with_a_labelled_bar_and_readable_protocol(fitted, tree, tmp_path):
    from pyimgano_core.model import Model

    cfg, model = fitted
    assert run("eval", cfg, "--model", model, "--out", tmp_path / "e", "-q").exit_code == 0
    report = json.loads((tmp_path / "e/t/widget/report.json").read_text())
    thr = Model.load(model).thresholds
    worst = report["worst_cases"]
    assert worst["colour_range"] == pytest.approx([thr.pixel_median, 2 * thr.pixel - thr.pixel_median])  # the overlays' scale
    assert worst["pixel_threshold"] == pytest.approx(thr.pixel) and "display range" in worst["colour_range_from"]
    bar = cv2.imread(str(tmp_path / "e/t/widget" / worst["colour_bar"]))
    assert bar is not None and bar.shape[1] > 300
    res = run("export-maps", "--model", model, "--input", tree / "widget/test/good", "--out", tmp_path / "x", "--json")
    assert json.loads(res.output)["categories"]["widget"]["display_range"] == pytest.approx(worst["colour_range"])
    html = (tmp_path / "e/t/widget/report.html").read_text()
    assert "colour bar" in html and "pixel threshold" in html and "image threshold" in html
    protocol = html[html.index("<h2>Protocol</h2>"):]
    assert "{'" not in protocol and "resized to 64x64, no crop" in protocol
    assert "centre-cropped" not in protocol and "whole image" in protocol


def test_main_config_shows_decisions_without_a_holdout_warning():
    from pyimgano_core.calibration import conformal_threshold
    from pyimgano_core.config import load_config

    cfg = load_config(ROOT / "configs/mvtec_patchcore_mobilenet.yaml")
    assert cfg.calibration is not None
    n_hold = round(cfg.calibration.holdout_fraction * 209)  # bottle's good training images
    _, k, expected, _, warning = conformal_threshold(np.arange(n_hold, dtype=float), 1 - cfg.calibration.image_quantile)
    assert warning is None and k == n_hold and expected <= 1 - cfg.calibration.image_quantile


def test_same_model_check_accepts_a_model_saved_without_a_display_range(tmp_path):
    from pyimgano_core.errors import OutputError
    from pyimgano_core.outputs.predictions import check_same_model

    (tmp_path / "predictions.jsonl").write_text('{"path": "a.png", "score": 1.0}\n')
    note = "per-image min-max (model saved without a display range)"
    (tmp_path / "summary.json").write_text(json.dumps({"thresholds": None, "display_range": note}))
    check_same_model(tmp_path, None, None)  # the same (old) model again: accepted
    with pytest.raises(OutputError, match="another model"):
        check_same_model(tmp_path, None, [0.0, 1.0])
