"""Paths in a manifest stay inside the manifest's folder unless the config allows otherwise."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pyimgano_core.data import load_splits
from pyimgano_core.errors import DataError


def _manifest(tmp_path, rows):
    root = tmp_path / "set"
    root.mkdir()
    img = np.full((8, 8, 3), 128, np.uint8)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(root / name), img)
    cv2.imwrite(str(tmp_path / "secret.png"), img)  # next to the folder, not in it
    path = root / "m.csv"
    path.write_text("image,split,label\n" + "".join(f"{r},train,good\n" for r in rows) + "c.png,test,good\n")
    return path


@pytest.mark.parametrize("entry", ["../secret.png", "sub/../../secret.png", "{abs}"])
def test_paths_escaping_the_manifest_folder_are_refused(tmp_path, entry):
    entry = entry.format(abs=tmp_path / "secret.png")
    path = _manifest(tmp_path, ["a.png", entry])
    with pytest.raises(DataError, match=r"line 3: image path .* is outside the manifest's folder .*allow_outside_root: true"):
        load_splits({"type": "manifest", "path": str(path)})
    [split] = load_splits({"type": "manifest", "path": str(path), "allow_outside_root": True})
    assert sorted(s.path.name for s in split.train) == ["a.png", "secret.png"]


def test_paths_inside_the_folder_are_fine(tmp_path):
    path = _manifest(tmp_path, ["a.png", f"{tmp_path}/set/b.png"])
    [split] = load_splits({"type": "manifest", "path": str(path)})
    assert len(split.train) == 2
