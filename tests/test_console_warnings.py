"""Warnings reach the console once per kind, with the fix, not only report.json."""
from __future__ import annotations

import cv2
import numpy as np
from typer.testing import CliRunner

from pyimgano_cli.app import app
from tests.helpers import write_config
from tests.synth import make_mvtec_tree

runner = CliRunner()


def test_zero_one_masks_and_small_holdout_are_printed_once_with_the_fix(tmp_path):
    tree = make_mvtec_tree(tmp_path / "d", n_train=6, n_test_good=2)
    for m in (tree / "widget/ground_truth").rglob("*.png"):
        cv2.imwrite(str(m), (cv2.imread(str(m), 0) > 0).astype(np.uint8))  # 0/1 masks
    cfg = write_config(tmp_path / "c.yaml", tree, calibration={"holdout_fraction": 0.34})
    res = runner.invoke(app, ["eval", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    fix = [x for x in lines if "set dataset.mask_threshold: 0" in x]
    assert len(fix) == 1 and fix[0].startswith("warning [widget]:"), res.output
    holdout = [x for x in lines if "no threshold can promise" in x]
    assert len(holdout) == 1 and "calibration.holdout_fraction" in holdout[0]
    assert "promised false-alarm rate on new good parts 0.333" in " ".join(res.output.split()), res.output
