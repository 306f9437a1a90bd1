"""A truncated PNG/JPEG fails with our one line only: no stray libpng/libjpeg/OpenCV stderr line."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pyimgano_core.data.io import read_image
from pyimgano_core.errors import DataError


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file_gives_our_message_and_nothing_else_on_stderr(tmp_path, capfd, ext):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(DataError, match=f"cannot read image .*cut{ext}: .*truncated"):
        read_image(path)
    err = capfd.readouterr().err
    assert err == "", err
    whole = tmp_path / f"whole{ext}"
    whole.write_bytes(data)
    assert read_image(whole).shape == (64, 64, 3)  # complete files still decode (OpenCV path)
