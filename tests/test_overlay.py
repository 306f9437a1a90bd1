"""Overlays: one fixed scale per run from the model, colour bar, score, contour, visible part."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.model import Model
from pyimgano_core.outputs.pictures import render_overlay
from tests.helpers import write_config
from tests.synth import make_mvtec_tree

runner = CliRunner()


def test_render_overlay_keeps_the_part_visible_and_draws_bar_score_and_contour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    amap = np.zeros((120, 160), np.float32)
    amap[40:80, 60:100] = 2.0
    mask = amap > 1
    out = render_overlay(image, amap, (0.0, 2.0), mask, score=2.0, image_threshold=1.0, pixel_threshold=1.0)
    assert out.shape[0] == 120 and out.shape[1] > 160  # colour bar on the right
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR).astype(int)
    quiet = (slice(90, 120), slice(0, 50))  # bottom of the scale, away from text and contour
    assert np.abs(out[quiet].astype(int) - bgr[quiet]).mean() < 0.2 * 255  # the photo shows through
    assert (out[40, 60:100] == 255).all(axis=-1).mean() > 0.5  # white contour on the mask boundary
    hot = out[55:65, 75:85].astype(int)
    assert hot[..., 2].mean() > hot[..., 0].mean() + 50  # inside: red end of JET
    bar = out[:, 160:]
    assert bar[2, :, 2].max() > 120 and bar[-3, :, 0].max() > 120  # red at the top, blue at the bottom


def test_uncalibrated_export_uses_the_scale_recorded_in_the_model(tmp_path):
    tree = make_mvtec_tree(tmp_path / "d", n_train=6, n_test_good=2)
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "m"), "-q"]).exit_code == 0
    model_dir = tmp_path / "m/t/widget/model"
    rec = Model.load(model_dir).meta["display_range"]
    assert rec["hi"] > rec["lo"] and "training images" in rec["source"]
    ranges, maxima = {}, {}
    for kind in ("good", "scratch"):
        res = runner.invoke(app, ["export-maps", "--model", str(model_dir), "--input", str(tree / f"widget/test/{kind}"),
                                  "--out", str(tmp_path / kind), "--json"])
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout)["categories"]["widget"]
        ranges[kind] = summary["display_range"]
        maxima[kind] = max(float(np.load(Path(r["files"]["map"])).max())
                           for r in map(json.loads, (Path(summary["out_dir"]) / "predictions.jsonl").read_text().splitlines()))
    assert ranges["good"] == ranges["scratch"] == [rec["lo"], rec["hi"]]  # not from the images exported
    # a per-image min-max scale would paint every good part's maximum red; on the fixed scale
    # the defective parts reach further up than the good ones
    assert maxima["scratch"] > maxima["good"]
