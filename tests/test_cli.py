"""End-to-end CLI tests on a synthetic MVTec-layout tree, and bad input handling."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pyimgano_cli.app import app
from tests.helpers import write_config
from tests.synth import make_mvtec_tree

runner = CliRunner()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_mvtec_tree(tmp_path_factory.mktemp("data"), n_train=8, n_test_good=3)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eval_json_report(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    res = run("eval", cfg, "--out", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    cat = summary["categories"]["widget"]
    assert set(cat["per_defect"]) == {"scratch", "dent"}
    report = json.loads((tmp_path / "out/t/widget/report.json").read_text())
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= report["metrics"][key] <= 1.0
    # planted blobs are easy: a working pipeline separates them
    assert report["metrics"]["image_auroc"] >= 0.9 and report["metrics"]["pixel_auroc"] >= 0.9
    assert report["counts"] == {"train": 8, "fit": 8, "calibration_holdout": 0, "test": 8, "test_good": 3,
                                "test_anomalous": 5, "pixel_evaluated": 8, "by_defect": {"dent": 2, "good": 3, "scratch": 3}}
    for key in ("fit_s", "predict_s_per_image", "total_s"):
        assert report["timing"][key] >= 0
    assert report["protocol"]["map_resolution"] == "original mask resolution"
    assert report["config"]["detector"]["params"]["coreset"]["ratio"] == 0.5
    assert "torch" in report["versions"]
    lines = (tmp_path / "out/t/widget/predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"path", "label", "defect_type", "score"} <= set(json.loads(lines[0]))


def test_fit_then_eval_with_saved_model_gives_identical_scores(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run("fit", cfg, "--out", tmp_path / "a", "-q").exit_code == 0
    assert (tmp_path / "a/t/widget/model/model.json").is_file()
    res = run("eval", cfg, "--model", tmp_path / "a/t", "--out", tmp_path / "b", "-q")
    assert res.exit_code == 0, res.output
    assert run("eval", cfg, "--out", tmp_path / "c", "-q").exit_code == 0
    loaded = [json.loads(x)["score"] for x in (tmp_path / "b/t/widget/predictions.jsonl").read_text().splitlines()]
    fresh = [json.loads(x)["score"] for x in (tmp_path / "c/t/widget/predictions.jsonl").read_text().splitlines()]
    assert loaded == fresh  # seeded fit is deterministic and save/load is exact


def test_export_maps_folder_with_corrupt_and_grayscale(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree, calibration={"holdout_fraction": 0.25})
    assert run("fit", cfg, "--out", tmp_path / "m", "-q").exit_code == 0
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in sorted((tree / "widget/test").rglob("*.png"))[:3]:
        (inbox / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    gray = cv2.imread(str(next((tree / "widget/test/good").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(inbox / "gray.png"), gray)
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = run("export-maps", cfg, "--model", tmp_path / "m/t", "--input", inbox, "--out", tmp_path / "x")
    assert res.exit_code == 3, res.output
    assert "broken.png" in res.output and "Traceback" not in res.output
    out = tmp_path / "x/t/widget/export"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"path", "score", "is_anomalous", "defect_area_px", "n_regions"} <= set(rows[0])
    assert (out / "gray.png_overlay.png").is_file() and (out / "gray.png_mask.png").is_file()
    amap = np.load(out / "gray.png_map.npy")
    assert amap.shape == gray.shape and amap.dtype == np.float16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["failures"][0]["path"].endswith("broken.png")


def test_validate_and_detectors_listing(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run("validate", cfg).exit_code == 0
    res = run("detectors", "--json")
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["patchcore"]["coreset.ratio"]["default"] == 0.1


BAD = [
    ({"--set": "detector.params.corset_ratio=0.1"}, "detector.params.corset_ratio: unknown key; allowed:"),
    ({"--set": "detector.name=patchcor"}, "Did you mean: patchcore"),
    ({"--set": "detector.params.coreset.ratio=lots"}, "detector.params.coreset.ratio"),
    ({"--set": "dataset.categroy=widget"}, "dataset.categroy: unknown key; allowed: category"),
    ({"--set": "dataset.root=/nonexistent/pyimgano"}, "/nonexistent/pyimgano"),
    ({"--set": "dataset.category=nope"}, "nope"),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_one_line_nonzero_and_earlier_report_untouched(tree, tmp_path, override, expected):
    cfg = write_config(tmp_path / "c.yaml", tree)
    out = tmp_path / "out"
    assert run("eval", cfg, "--out", out, "-q").exit_code == 0
    report = out / "t/widget/report.json"
    before = report.read_bytes()
    res = run("eval", cfg, "--out", out, "--set", override["--set"])
    assert res.exit_code != 0
    assert expected in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert report.read_bytes() == before


def test_corrupt_test_image_and_mask_size_mismatch(tmp_path):
    root = make_mvtec_tree(tmp_path / "d1")
    bad = root / "widget/test/scratch/000.png"
    bad.write_bytes(b"garbage")
    res = run("eval", write_config(tmp_path / "c1.yaml", root), "--out", tmp_path / "o", "-q")
    assert res.exit_code != 0 and "000.png" in res.output and "Traceback" not in res.output

    root = make_mvtec_tree(tmp_path / "d2")
    mask = root / "widget/ground_truth/dent/001_mask.png"
    cv2.imwrite(str(mask), np.zeros((10, 12), np.uint8))
    res = run("eval", write_config(tmp_path / "c2.yaml", root), "--out", tmp_path / "o", "-q")
    assert res.exit_code != 0 and "001_mask.png" in res.output and "Traceback" not in res.output


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndataset: [unclosed\n")
    res = run("validate", p)
    assert res.exit_code == 2 and "invalid YAML" in res.output
    res = run("validate", tmp_path / "missing.yaml")
    assert res.exit_code == 2 and "not found" in res.output


def test_few_shot_uses_k_seeded_images(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    reports = []
    for seed in ("0", "0", "1"):
        res = run("eval", cfg, "--out", tmp_path / seed, "--set", "dataset.shots=2", "--set", f"seed={seed}", "-q")
        assert res.exit_code == 0, res.output
        reports.append(json.loads((tmp_path / seed / "t/widget/report.json").read_text()))
    assert reports[0]["counts"]["fit"] == 2 and len(reports[0]["few_shot_images"]) == 2
    assert reports[0]["few_shot_images"] == reports[1]["few_shot_images"] != reports[2]["few_shot_images"]
    res = run("eval", cfg, "--out", tmp_path / "x", "--set", "dataset.shots=99")
    assert res.exit_code != 0 and "dataset.shots=99" in res.output


def test_infer_api_matches_export(tree, tmp_path):
    from pyimgano_core.infer import load_model

    cfg = write_config(tmp_path / "c.yaml", tree, calibration={"holdout_fraction": 0.25})
    assert run("fit", cfg, "--out", tmp_path / "m", "-q").exit_code == 0
    inspector = load_model(tmp_path / "m/t/widget/model")
    bad = sorted((tree / "widget/test/scratch").glob("*.png"))[0]
    good = sorted((tree / "widget/test/good").glob("*.png"))[0]
    r_bad, r_good = inspector.predict(bad), inspector.predict(str(good))
    assert r_bad.is_anomalous and r_bad.score > r_good.score
    assert r_bad.anomaly_map.shape == (64, 64) and r_bad.mask.dtype == bool and r_bad.mask.any()
    gt = cv2.imread(str(tree / "widget/ground_truth/scratch" / f"{bad.stem}_mask.png"), 0) > 0
    assert (r_bad.mask & gt).sum() > 0.3 * gt.sum()  # the predicted mask finds the planted blob
    report = json.loads((tmp_path / "m/t/summary.json").read_text())
    assert report["categories"]["widget"]["thresholds"]["image"] == inspector.model.thresholds.image


def test_saved_model_with_other_settings_is_refused(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run("fit", cfg, "--out", tmp_path / "m", "-q").exit_code == 0
    res = run("eval", cfg, "--model", tmp_path / "m/t", "--set", "detector.params.coreset.ratio=0.25", "--out", tmp_path / "o")
    assert res.exit_code == 4 and "coreset.ratio=0.5" in res.output and "Traceback" not in res.output
    res = run("eval", cfg, "--model", tmp_path / "m/t", "--set", "postprocess.blur_sigma=2", "--out", tmp_path / "o")
    assert res.exit_code == 4 and "postprocess" in res.output
    res = run("eval", cfg, "--model", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert res.exit_code == 4 and "nowhere" in res.output


def test_detectors_listing_human_readable():
    res = run("detectors")
    assert res.exit_code == 0, res.output
    assert "patchcore" in res.output and "softpatch" in res.output and "coreset.ratio = 0.1" in res.output
