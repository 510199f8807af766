"""Record and image headers read from bytes, without decoding: MXNet's ``IRHeader``, the JPEG and PNG markers, and
:func:`image_problem`, the check of an image's headers that ``verify`` and the trainer's start-up check share.

Standard library only (no OpenCV, Pillow or MXNet), so ``xception_mx.records`` runs it over every record at start.
"""
from __future__ import annotations

import struct

__all__ = ["IR_HEADER", "PNG_SIGNATURE", "PNG_END", "JPEG_SOF", "image_problem"]

#: MXNet's IRHeader before each image: flag (u32), label (f32), id (u64), id2 (u64); flag > 0: that many labels.
IR_HEADER = struct.Struct("<IfQQ")
#: The first 8 bytes of every PNG.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The last 12 bytes of a complete PNG: the empty IEND chunk with its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
#: JPEG start-of-frame markers (every SOFn but DHT 0xC4, JPG 0xC8 and DAC 0xCC): they carry the image's size.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def image_problem(data: bytes, complete: bool = True) -> str | None:
    """Why MXNet could not decode these image bytes, from their headers alone, or None; "incomplete" when more of
    the image is needed to tell. Hand-written: PIL would need the whole image, and this runs over every record at
    start. OpenCV's decoder (inside ImageRecordIter) returns nothing for a non-image or a JPEG cut off before its scan
    data, and MXNet then dies with SIGFPE; data damaged inside the scan decodes with a libjpeg warning instead."""
    if data[:8] == PNG_SIGNATURE:
        ok = len(data) >= 24 and min(struct.unpack(">II", data[16:24])) > 0
        return None if ok else "holds a PNG whose header gives no size"
    if data[:2] != b"\xff\xd8":
        return "holds no decodable image (neither a JPEG nor a PNG)"
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return "holds a JPEG whose markers are damaged"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        seg = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in JPEG_SOF and pos + 9 <= len(data):
            size = struct.unpack(">HH", data[pos + 5:pos + 9])
            if not min(size):
                return "holds a JPEG whose header gives no size"
        if marker == 0xDA:  # start of scan: the compressed data follows
            return None if size else "holds a JPEG with no frame header before its data"
        if seg < 2:
            return "holds a JPEG whose markers are damaged"
        pos += 2 + seg
    return "incomplete" if not complete else "holds a JPEG cut off before its image data"
