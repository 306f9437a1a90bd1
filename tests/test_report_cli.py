"""report.html, summaries, --fail-under and compare end to end through the CLI, and the page in Chromium."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pyimgano_cli.app import app
from tests.browser import find_chromium, open_page
from tests.helpers import write_config
from tests.synth import make_mvtec_tree

runner = CliRunner()
CATS = ("gadget", "widget")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: two categories, an AUPRO gate nobody meets. Run B: widget only, maps blurred flat."""
    base = tmp_path_factory.mktemp("report")
    root = base / "data"
    for seed, cat in enumerate(CATS):
        make_mvtec_tree(root, category=cat, n_train=6, n_test_good=3, defects={"scratch": 2, "dent": 2}, seed=seed)
    cfg = write_config(base / "c.yaml", root)
    a = run("eval", cfg, "--out", base / "a", "--fail-under", "image_auroc=0.5,aupro=0.9999", "-q")
    b = run("eval", cfg, "--out", base / "b", "--set", "dataset.category=widget", "--set", "postprocess.blur_sigma=12",
            "--fail-under", "image_auroc=0.5", "-q")
    return {"cfg": cfg, "a": a, "b": b, "dir_a": base / "a/t", "dir_b": base / "b/t"}


def test_fail_under_exit_code_and_one_line_per_shortfall(runs):
    res = runs["a"]
    assert res.exit_code == 6, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("gate failed:")]
    report = {c: json.loads((runs["dir_a"] / c / "report.json").read_text()) for c in CATS}  # still written
    assert lines == [f"gate failed: {c}: aupro {report[c]['metrics']['aupro']:.4f} < 0.9999" for c in CATS]
    assert runs["b"].exit_code == 0, runs["b"].output  # a gate that is met passes


def test_unknown_gate_metric_is_a_config_error_before_any_work(runs, tmp_path):
    res = run("eval", runs["cfg"], "--out", tmp_path / "x", "--fail-under", "image_auroc=0.9,pixel_aupro=0.9")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "unknown metric 'pixel_aupro'; allowed: image_auroc, image_ap, pixel_auroc, pixel_ap, aupro" in res.output
    assert not (tmp_path / "x").exists()


def test_report_json_curves_and_worst_cases(runs):
    report = json.loads((runs["dir_a"] / "widget/report.json").read_text())
    c = report["curves"]
    assert c["image"]["roc"]["fpr"][0] == 0 and c["image"]["roc"]["tpr"][-1] == 1
    assert c["pixel"]["roc"]["fpr"][-1] == 1 and c["pixel"]["pro"]["fpr"][-1] == pytest.approx(0.3)
    assert np.trapezoid(c["pixel"]["roc"]["tpr"], c["pixel"]["roc"]["fpr"]) == pytest.approx(report["metrics"]["pixel_auroc"], abs=5e-3)
    w = report["worst_cases"]
    scores = {r["path"]: r["score"] for r in map(json.loads, (runs["dir_a"] / "widget/predictions.jsonl").read_text().splitlines())}
    good = sorted((s, p) for p, s in scores.items() if "/good/" in p)
    assert [r["path"] for r in w["highest_scoring_good"]] == [p for _, p in sorted(good, reverse=True)]
    bad = sorted((s, p) for p, s in scores.items() if "/good/" not in p)
    assert [r["path"] for r in w["lowest_scoring_defective"]] == [p for _, p in bad]
    pro = [r["aupro"] for r in w["worst_localised"]]
    assert pro == sorted(pro) and len(pro) == 4
    tile = cv2.imread(str(runs["dir_a"] / "widget" / w["worst_localised"][0]["image"]))
    assert tile.shape == (64, 2 * 64 + 4, 3)
    assert (tile[..., 1] == 255).sum() > 20  # the green ground-truth contour is drawn


def test_summary_md_and_index(runs):
    md = (runs["dir_a"] / "summary.md").read_text().splitlines()
    summary = json.loads((runs["dir_a"] / "summary.json").read_text())
    assert md[2] == "| category | image AUROC | image AP | pixel AUROC | pixel AP | AUPRO |"
    assert [row.split(" | ")[0] for row in md[4:7]] == ["| gadget", "| widget", "| **mean**"]
    assert f"**{summary['mean']['aupro']:.3f}**" in md[6]
    index = (runs["dir_a"] / "index.html").read_text()
    assert all(f'href="{c}/report.html"' in index for c in CATS)


def test_report_command_rebuilds_the_same_page_from_saved_files(runs):
    page = runs["dir_a"] / "widget/report.html"
    before = page.read_text()
    page.unlink()
    res = run("report", runs["dir_a"])
    assert res.exit_code == 0, res.output
    assert page.read_text() == before
    assert run("report", runs["dir_a"] / "widget").exit_code == 0
    res = run("report", runs["dir_a"] / "nowhere")
    assert res.exit_code == 3 and "no report.json or summary.json" in res.output


def test_html_false_skips_pages_but_keeps_curves(runs, tmp_path):
    res = run("eval", runs["cfg"], "--out", tmp_path, "--set", "output.html=false", "--set", "dataset.category=gadget", "-q")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "t/gadget/report.html").exists() and not (tmp_path / "t/index.html").exists()
    assert json.loads((tmp_path / "t/gadget/report.json").read_text())["curves"]["pixel"]["pro"]
    assert (tmp_path / "t/summary.md").is_file()


def test_compare_flags_regressions_and_missing_categories(runs):
    a, b = runs["dir_a"], runs["dir_b"]
    same = run("compare", a, a, "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["n_regressions"] == 0
    res = run("compare", a, b, "--json")
    assert res.exit_code == 6, res.output
    out = json.loads(res.stdout)
    rows = {(r["category"], r["metric"]): r for r in out["rows"]}
    ma = json.loads((a / "widget/report.json").read_text())["metrics"]
    mb = json.loads((b / "widget/report.json").read_text())["metrics"]
    for key in ma:
        assert rows[("widget", key)]["diff"] == pytest.approx(mb[key] - ma[key])
        assert (rows[("widget", key)]["status"] == "regression") == (mb[key] - ma[key] < -0.005)
    assert rows[("widget", "pixel_ap")]["status"] == "regression"  # blurring flat maps costs pixel AP
    assert rows[("gadget", None)]["why"] == "category missing in B"
    human = run("compare", a, b, "--tolerance", "1")
    assert human.exit_code == 6 and "REGRESSION" in human.output  # the missing category stays a regression
    back = run("compare", b / "widget", a / "widget", "--tolerance", "1")
    assert back.exit_code == 0, back.output
    bad = run("compare", a, a / "nowhere")
    assert bad.exit_code == 3 and "Traceback" not in bad.output


# ------------------------------------------------------------------------------ real browser
def _need_chromium():
    if find_chromium() is None:
        pytest.skip("Chromium not found (install the Debian package 'chromium', or set $CHROMIUM)")


def test_chromium_detects_errors_on_a_broken_page(tmp_path):
    """The console check can fail: a missing image, console.error and an exception are all seen."""
    _need_chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>hello 0.123</p>'
                    '<img src="missing.png"><script>console.error("boom"); undefined_function();</script></body></html>')
    res = open_page(page.as_uri())
    assert "hello 0.123" in res.text
    joined = " | ".join(res.errors)
    assert "boom" in joined and "undefined_function" in joined and "missing.png" in joined, res.errors


def test_report_page_in_headless_chromium(runs):
    _need_chromium()
    cat = runs["dir_a"] / "widget"
    res = open_page((cat / "report.html").as_uri())
    assert res.errors == []
    (cat / "screenshot.png").write_bytes(res.screenshot)
    shot = cv2.imdecode(np.frombuffer(res.screenshot, np.uint8), cv2.IMREAD_COLOR)
    assert shot.shape[1] >= 1300 and shot.shape[0] > 2000 and shot.std() > 20  # a full page, not blank
    report = json.loads((cat / "report.json").read_text())
    values = [report["metrics"][k] for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")]
    values += [m[k] for m in report["per_defect"].values() for k in ("image_auroc", "pixel_auroc", "aupro")]
    for v in values:
        assert f"{v:.3f}" in res.text
    for title in ("Worst cases", "Highest-scoring good", "Worst-localised", "Protocol", "Config"):
        assert title in res.text
    index = open_page((runs["dir_a"] / "index.html").as_uri())
    assert index.errors == [] and f"{report['metrics']['aupro']:.3f}" in index.text
