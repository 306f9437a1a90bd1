"""Image and mask decoding: every conversion checked against known pixel values."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from PIL import Image

from pyimgano_core.data import io
from pyimgano_core.data.io import image_size, read_image, read_mask
from pyimgano_core.errors import DataError


@pytest.fixture(params=["opencv", "pil"])
def decoder(request, monkeypatch):
    """Run a test through OpenCV and, with imdecode disabled, through the PIL fallback."""
    if request.param == "pil":
        monkeypatch.setattr(io.cv2, "imdecode", lambda *a, **k: None)
    return request.param


def _rgb():
    a = np.zeros((5, 7, 3), np.uint8)
    a[0, 0] = (255, 0, 0)  # red, to catch BGR/RGB swaps
    a[1, 2] = (0, 255, 0)
    a[4, 6] = (10, 20, 250)
    return a


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_rgb_lossless_formats_keep_rgb_order(tmp_path, decoder, ext):
    a = _rgb()
    p = tmp_path / f"x{ext}"
    Image.fromarray(a).save(p)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a)


def test_jpeg_is_read_as_rgb(tmp_path, decoder):
    a = np.zeros((16, 16, 3), np.uint8)
    a[..., 0] = 200  # uniformly red: JPEG keeps flat colours nearly exact
    Image.fromarray(a).save(tmp_path / "x.jpg", quality=95)
    out = read_image(tmp_path / "x.jpg")
    assert out.shape == (16, 16, 3)
    assert abs(int(out[..., 0].mean()) - 200) <= 2 and out[..., 2].mean() < 5


def test_grayscale_replicated_to_three_channels(tmp_path, decoder):
    g = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(g).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgba_alpha_dropped_not_blended(tmp_path, decoder):
    a = _rgb()
    rgba = np.dstack([a, np.full((5, 7), 0, np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), a)


def test_gray_alpha(tmp_path, decoder):
    la = np.dstack([np.full((4, 4), 77, np.uint8), np.full((4, 4), 9, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == 77).all()


def test_palette_expanded_to_colours(tmp_path, decoder):
    idx = np.zeros((4, 5), np.uint8)
    idx[1, 1] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert tuple(out[1, 1]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)


def test_16bit_gray_scaled_full_range(tmp_path, decoder):
    v = np.array([[0, 257, 257 * 128, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), v)
    out = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_16bit_rgb_tiff_scaled_and_rgb(tmp_path):
    v = np.zeros((2, 2, 3), np.uint16)
    v[0, 0] = (65535, 0, 257 * 10)  # RGB
    cv2.imwrite(str(tmp_path / "d.tif"), v[..., ::-1].copy())  # OpenCV writes BGR
    out = read_image(tmp_path / "d.tif")
    assert out.dtype == np.uint8 and tuple(out[0, 0]) == (255, 0, 10)


def test_mask_gray_threshold_is_strict(tmp_path, decoder):
    m = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", 127)[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", 0)[0], [0, 1, 1, 1])


def test_mask_rgb_uses_channel_max(tmp_path, decoder):
    m = np.zeros((2, 3, 3), np.uint8)
    m[0, 0] = (255, 0, 0)  # pure red: luminance 76 would fall under 127
    m[0, 1] = (0, 0, 200)
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png", 127)
    assert out.dtype == bool and out.shape == (2, 3)
    np.testing.assert_array_equal(out, [[1, 1, 0], [0, 0, 0]])


def test_mask_palette_and_rgba(tmp_path, decoder):
    idx = np.array([[0, 1]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # VOC-style class 1 colour
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", 127)[0], [0, 1])
    rgba = np.array([[[0, 0, 0, 255], [255, 255, 255, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "a.png", 127)[0], [0, 1])


def test_mask_16bit(tmp_path, decoder):
    cv2.imwrite(str(tmp_path / "full.png"), np.array([[0, 65535, 30000]], np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "full.png", 127)[0], [0, 1, 0])
    # 0/1 labels in a 16-bit container are not scaled away.
    cv2.imwrite(str(tmp_path / "lab.png"), np.array([[0, 1]], np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "lab.png", 0)[0], [0, 1])


def test_image_size_is_height_width(tmp_path):
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(tmp_path / "x.png")
    assert image_size(tmp_path / "x.png") == (30, 50)
    assert image_size(str(tmp_path / "x.png")) == (30, 50)


@pytest.mark.parametrize("fn", [read_image, read_mask, image_size])
def test_unreadable_files_raise_data_error_naming_file(tmp_path, fn):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 10)
    cases = [tmp_path / "missing.png", tmp_path / "empty.png", tmp_path / "junk.png", tmp_path]
    for path in cases:
        with pytest.raises(DataError, match=r"cannot read image .*" + path.name):
            fn(path)


def test_truncated_png_raises(tmp_path):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_read_900px_png_speed(tmp_path):
    """A 900x900 RGB PNG (MVTec size) must decode well within a frame budget."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:900]
    img = np.dstack([(xx + yy) % 256, (xx * 2) % 256, (yy * 3) % 256]).astype(np.uint8)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), img)
    read_image(tmp_path / "big.png")
    t0 = time.perf_counter()
    for _ in range(5):
        out = read_image(tmp_path / "big.png")
    per_image = (time.perf_counter() - t0) / 5
    assert out.shape == (900, 900, 3)
    assert per_image < 0.25, f"{per_image * 1000:.0f} ms per 900x900 PNG"
