"""Turn any image file's bytes into a 3-channel BGR uint8 array, shrink it, and re-encode it as JPEG.

Decoding is by content (OpenCV reads the magic bytes), so a PNG saved as ``.JPEG`` is fine. Greyscale becomes
3 grey channels, CMYK JPEGs are converted by OpenCV's decoder, an alpha channel is composited onto white, 16-bit
images are scaled to 8 bits. Images are never upscaled: with ``--resize S`` only images whose shorter side exceeds
``S`` shrink (INTER_AREA), since upscaling adds no detail and training-time crops resize anyway.
"""
from __future__ import annotations

import numpy as np

from xception_mx.installed import import_cv2

cv2 = import_cv2()  # one line naming what to install when OpenCV cannot load (no libGL.so.1)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason."""


def decode_bgr(data: bytes) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 BGR array."""
    if not data:
        raise ImageDecodeError("empty file")
    # Any dtype (cv2's stubs type it integer | floating, with no '>>') and None when undecodable (unlisted there).
    img: np.ndarray | None = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageDecodeError("OpenCV cannot decode it (not an image, or truncated)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if channels == 2:  # grey + alpha
        return _over_white(cv2.cvtColor(img[:, :, :1], cv2.COLOR_GRAY2BGR), img[:, :, 1])
    if channels == 3:
        return img
    if channels == 4:
        return _over_white(img[:, :, :3], img[:, :, 3])
    raise ImageDecodeError(f"unsupported channel count {channels}")


def _over_white(bgr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    return np.clip(bgr.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def shrink_shorter_side(img: np.ndarray, shorter_side: int) -> np.ndarray:
    """Resize so the shorter side is ``shorter_side``, keeping the aspect ratio; never upscales (0 = keep)."""
    h, w = img.shape[:2]
    if shorter_side <= 0 or min(h, w) <= shorter_side:
        return img
    scale = shorter_side / min(h, w)
    size = (shorter_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), shorter_side)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageDecodeError("OpenCV failed to encode it as JPEG")
    return buf.tobytes()


def prepare_jpeg(path: str, shorter_side: int = 0, quality: int = 95) -> bytes:
    """Read a file and return it as a 3-channel JPEG; ImageDecodeError with the reason if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"cannot read it: {e.strerror or e}") from None
    return encode_jpeg(shrink_shorter_side(decode_bgr(data), shorter_side), quality)
