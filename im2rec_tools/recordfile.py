"""Read one RecordIO record at a byte offset and say exactly what is wrong with it when it is damaged.

Hand-written because MXNet's reader (``MXRecordIO.read``) stops with a C++ check failure on the first bad header and
cannot say which record failed or go on to the next one; ``verify`` needs every bad record listed. The layout is
dmlc-core's ``RecordIOWriter``: each part is ``magic (u32) | cflag << 29 | length (u32) | data | zero padding to 4``;
a record whose payload contains the magic number at a 4-byte boundary is split into parts (cflag 1 = first,
2 = middle, 3 = last) and the reader puts the magic back between them.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER_BYTES = 8
_LENGTH_MASK = (1 << 29) - 1


class RecordError(ValueError):
    """A record that cannot be read; the message is the reason."""


def read_record(f: BinaryIO, offset: int, file_size: int) -> tuple[bytes, int]:
    """Return (payload, offset just past the record) for the record starting at ``offset``."""
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + HEADER_BYTES > file_size:
            raise RecordError(f"record header at byte {pos} runs past the end of the file ({file_size} bytes): "
                              f"the .rec is truncated")
        f.seek(pos)
        magic, lrec = struct.unpack("<II", f.read(HEADER_BYTES))
        if magic != MAGIC:
            raise RecordError(f"no record starts at byte {pos} (magic 0x{magic:08x}, expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if (not parts and cflag not in (0, 1)) or (parts and cflag not in (2, 3)):
            raise RecordError(f"record part at byte {pos} has continuation flag {cflag} out of sequence")
        padded = (length + 3) & ~3
        if pos + HEADER_BYTES + padded > file_size:
            raise RecordError(f"record at byte {offset} claims {length} bytes but the file ends first: "
                              f"the .rec is truncated")
        parts.append(f.read(length))
        pos += HEADER_BYTES + padded
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts), pos
