"""PatchCore's ``rotations``: the memory bank also holds every training image rotated (issue 28's bank augmentation)."""
from __future__ import annotations

import numpy as np
import pytest

from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.patchknn.rotations import rotate
from tests.helpers import TINY_CNN, assert_one_line, run_cli as run, small_mvtec_tree, write_config


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return small_mvtec_tree(tmp_path_factory)


@pytest.mark.parametrize("value,needles", [
    ("[]", ["detector.params.rotations", "empty rotation set"]),
    ("[0,90,360]", ["detector.params.rotations", "[0, 360)"]),
    ("[0,-90]", ["detector.params.rotations", "[0, 360)"]),
    ("[0,90,90]", ["detector.params.rotations", "listed twice"]),
    ("[90,180]", ["detector.params.rotations", "include 0"]),
])
def test_a_rotation_set_that_makes_no_sense_is_one_line_naming_the_field(tree, tmp_path, value, needles):
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert_one_line(run("validate", cfg, "--set", f"detector.params.rotations={value}"), 2, *needles)


def test_valid_rotations_validate(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run("validate", cfg, "--set", "detector.params.rotations=[0,90,180,270]").exit_code == 0


def _fit(images, **extra):
    det = create_detector("patchcore", **dict(TINY_CNN, coreset={"ratio": 1.0}, **extra))
    det.fit(images)
    return det


def test_the_bank_holds_each_image_under_every_angle_and_knows_a_rotated_part():
    rng = np.random.default_rng(0)
    # an asymmetric part: a bar along one axis, so a quarter turn is a new picture for a plain bank
    images = []
    for _ in range(3):
        img = np.full((64, 64, 3), 30, np.uint8)
        img[28:36, 8:56] = 220
        images.append(np.clip(img + rng.integers(0, 6, img.shape), 0, 255).astype(np.uint8))
    plain, rotated = _fit(images), _fit(images, rotations=[0, 90])
    assert rotated.memory_.shape[0] == 2 * plain.memory_.shape[0]  # ratio 1: every patch of every copy
    turned = rotate(images[0], 90)
    s_plain = float(plain.predict([turned]).scores[0])
    s_rot = float(rotated.predict([turned]).scores[0])
    assert s_rot < 0.5 * s_plain, (s_rot, s_plain)
    assert "90" in rotated.protocol()["bank_augmentation"]
