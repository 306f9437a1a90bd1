"""Request bytes -> an HxWx3 uint8 RGB image, or one clear reason why not.

Checks run cheapest first and before any pixel is decoded: the format's signature, the size
in the header (a 30000x30000 PNG is refused from its first 24 bytes, never allocated), the
smallest usable size, and that a PNG/JPEG is complete (a truncated upload would otherwise be
decoded by libpng/libjpeg into a half-grey picture and scored). Only then OpenCV decodes it;
OpenCV is BGR, converted to RGB here explicitly. Keep every request decode in this module:
the scoring side receives RGB arrays only.
"""
from __future__ import annotations

import io
import cv2
import numpy as np

from ..errors import DataError
from .options import DecodeLimits

SIGNATURES = {  # leading bytes -> format name
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}


class ImageTooLarge(DataError):
    """The header announces more pixels than the server decodes (HTTP 413)."""


def sniff(data: bytes) -> str | None:
    """The image format from its signature, or None."""
    for sig, name in SIGNATURES.items():
        if data.startswith(sig):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header only."""
    if fmt == "PNG":  # IHDR is the first chunk: width and height at bytes 16-24
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise DataError("truncated PNG: the header (IHDR) is incomplete")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own limit applies (below); PIL would warn or raise on its own
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken header
        raise DataError(f"not a readable {fmt} image ({str(exc) or type(exc).__name__})") from None


def complete(data: bytes, fmt: str) -> bool:
    """False for a PNG whose chunks stop before IEND or a JPEG without its end marker."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    if fmt != "PNG":
        return True
    pos, n = 8, len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IEND":
            return pos + 12 + length <= n
        pos += 12 + length
    return False


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode request bytes to HxWx3 uint8 **RGB** (gray is replicated, alpha dropped, 16-bit
    reduced by OpenCV). Raises :class:`DataError` (or :class:`ImageTooLarge`) with one line."""
    if not data:
        raise DataError("empty body: send the image bytes (multipart field 'image', or the raw bytes with Content-Type image/png or image/jpeg)")
    fmt = sniff(data)
    if fmt is None:
        raise DataError("not an image: the bytes are not PNG, JPEG, BMP, TIFF or WebP")
    w, h = header_size(data, fmt)
    if w * h > limits.max_pixels:
        raise ImageTooLarge(f"image too large: the {fmt} header says {w}x{h} ({w * h / 1e6:.0f} MP); "
                            f"this server decodes at most {limits.max_pixels / 1e6:.0f} MP")
    if min(w, h) < limits.min_side:
        raise DataError(f"image too small: {w}x{h}; each side needs at least {limits.min_side} px")
    if not complete(data, fmt):
        raise DataError(f"truncated {fmt}: the file ends before its last {'chunk (IEND)' if fmt == 'PNG' else 'marker'}; "
                        "send the complete file")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (h, w):
        raise DataError(f"corrupt {fmt}: OpenCV cannot decode the pixel data")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
