"""Image and mask I/O: one decoding path for every dataset layout.

Images come back as ``uint8 HxWx3`` RGB whatever is on disk (grayscale, RGBA,
palette, 16-bit, JPEG/PNG/BMP/TIFF); masks come back as ``bool HxW``.

OpenCV decodes first because it is the fastest decoder here (a 900x900 RGB PNG:
~14 ms with OpenCV vs ~20 ms with PIL); PIL is the fallback for what OpenCV
refuses (some TIFF compressions, GIF) and supplies the error reason when both fail.
EXIF orientation is ignored on purpose: masks are annotated on the stored pixels,
and ``image_size`` (a header read) must agree with the decoded array.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import DataError

#: File suffixes (lower case) treated as images when listing folders.
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def is_image_file(path: Path) -> bool:
    """True for a visible file whose suffix is a known image format."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _fail(path, reason) -> DataError:
    return DataError(f"cannot read image {path}: {reason}")


def _decode(path: str | os.PathLike) -> np.ndarray:
    """Decode a file as stored (bit depth and channels kept).

    ``np.fromfile`` + ``imdecode`` rather than ``imread``: it handles non-ASCII
    paths on every OS and turns a missing file into a plain ``OSError`` instead of
    an OpenCV warning on stderr.
    """
    if not os.path.isfile(path):
        raise _fail(path, "no such file" if not os.path.exists(path) else "not a file")
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _fail(path, exc.strerror or exc) from None
    if buf.size == 0:
        raise _fail(path, "empty file")
    if not _complete(buf):  # let PIL name the problem: libpng/libjpeg would print stray stderr lines
        return _decode_pil(path)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is not None:
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            # OpenCV is BGR(A); flip to RGB(A) so both decoders agree. cvtColor is
            # ~20x faster than a numpy channel flip on a 900x900 image.
            code = cv2.COLOR_BGR2RGB if arr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
            arr = _convert(arr, code, [2, 1, 0, 3][: arr.shape[2]])
        return arr
    return _decode_pil(path)


_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _complete(buf: np.ndarray) -> bool:
    """False for a PNG whose chunk chain stops before IEND (a truncated file: a partial upload
    or copy) or a JPEG without its end marker. OpenCV prints ``libpng error: ...`` /
    ``Corrupt JPEG data`` / ``[ WARN ]`` lines on stderr for those before failing; PIL gives
    the reason as an exception instead. Walks chunk headers only (microseconds; CRCs are not
    checked, so a bit flip inside a complete file is still OpenCV's to report)."""
    head = buf[:8].tobytes()
    if head[:2] == b"\xff\xd8":
        tail = buf[-64:].tobytes().rstrip(b"\x00")
        return tail.endswith(b"\xff\xd9")
    if head != _PNG_SIG:
        return True
    pos, n = 8, len(buf)
    while pos + 12 <= n:
        length = int.from_bytes(buf[pos : pos + 4].tobytes(), "big")
        if buf[pos + 4 : pos + 8].tobytes() == b"IEND":
            return pos + 12 + length <= n
        pos += 12 + length
    return False


def _convert(arr: np.ndarray, code: int, channels: list[int]) -> np.ndarray:
    """``cv2.cvtColor`` where it supports the dtype, else the numpy equivalent."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return cv2.cvtColor(arr, code)
    return np.ascontiguousarray(
        arr[..., channels] if arr.ndim == 3 else arr[..., None][..., channels]
    )


def _decode_pil(path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
                im = im.convert("RGB")
            arr = np.array(im)
    except Exception as exc:  # PIL raises many types for broken files
        raise _fail(path, str(exc) or type(exc).__name__) from None
    if arr.dtype == np.int32:  # PIL mode "I" holds 16-bit PNG/TIFF data
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return arr


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map any bit depth to uint8 without per-image normalisation.

    16-bit data is scaled by 255/65535 (full range to full range) so that every
    image of a set goes through the same fixed mapping; stretching each image to
    its own min/max would change its intensities relative to the others.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        # Float TIFFs are conventionally 0..1; anything larger is taken as 0..255.
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB.

    Parameters
    ----------
    path : str or PathLike
        Image file (PNG, JPEG, BMP, TIFF, WebP; gray, RGB, RGBA, palette, 8/16-bit).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(H, W, 3)``, RGB. Alpha is dropped (not blended),
        gray is replicated to three channels, 16-bit is scaled by 255/65535.

    Raises
    ------
    DataError
        ``cannot read image <path>: <reason>`` for a missing, empty or corrupt file.
    """
    arr = _decode(path)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray (+ alpha)
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return _convert(_to_uint8(arr), cv2.COLOR_GRAY2RGB, [0, 0, 0])
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _to_uint8(_convert(arr, cv2.COLOR_RGBA2RGB, [0, 1, 2]))
    if arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(_to_uint8(arr))
    raise _fail(path, f"unsupported array shape {arr.shape}")


def read_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Read a ground-truth mask as a boolean defect map.

    Parameters
    ----------
    path : str or PathLike
        Mask file. 8-bit gray is the norm; RGB/palette masks are reduced with the
        per-pixel maximum over channels (a coloured annotation on black counts
        whatever its hue; a luminance conversion would lose pure red or blue);
        alpha is ignored. 16-bit masks are scaled to 8-bit like images, except when
        every value already fits in 0..255 (label tools often store 0/1 or 0/255
        in a 16-bit container; scaling would erase them).
    threshold : int
        A pixel is a defect when its 8-bit value is ``> threshold``
        (127 for 0/255 and soft masks, 0 for "any non-zero").

    Returns
    -------
    numpy.ndarray
        ``bool`` array of shape ``(H, W)``.

    Raises
    ------
    DataError
        When the file is missing or cannot be decoded.
    """
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr[:, :, : (1 if arr.shape[2] <= 2 else 3)].max(axis=2)
    if arr.dtype == np.uint16 and int(arr.max(initial=0)) <= 255:
        arr = arr.astype(np.uint8)
    return _to_uint8(arr) > threshold


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(height, width)`` from the file header without decoding pixels.

    Raises
    ------
    DataError
        When the file is missing or its header is unreadable.
    """
    if not os.path.isfile(path):
        raise _fail(path, "no such file" if not os.path.exists(path) else "not a file")
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
    except Exception:
        # PIL cannot parse every header OpenCV can decode; pay for a full decode.
        arr = _decode(path)
        h, w = arr.shape[:2]
    return int(h), int(w)
