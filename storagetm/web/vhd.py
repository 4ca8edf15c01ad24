"""A fixed VHD: the raw disk followed by a 512-byte footer (Microsoft's "Virtual Hard Disk
Image Format Specification", 2006). Windows mounts one with a double-click; a raw image it
does not. Every field is big-endian."""

from __future__ import annotations

import struct
import uuid

FOOTER_SIZE = 512
COOKIE = b"conectix"
FEATURES = 2  # "reserved": always set
VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # a fixed disk has no dynamic header
DISK_TYPE_FIXED = 2
CREATOR_APP = b"stm "
CREATOR_VERSION = 0x00010000
CREATOR_HOST = b"Wi2k"
EPOCH_2000 = 946684800  # 2000-01-01 00:00:00 UTC as a Unix time
SECTOR = 512
MAX_SECTORS = 65535 * 16 * 255  # the largest geometry CHS can say
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_CHECKSUM_OFFSET = 64


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `size` bytes: the spec's algorithm
    (appendix "CHS Calculation"), integer division throughout."""
    total = min(size // SECTOR, MAX_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def checksum(footer: bytes) -> int:
    """One's complement of the sum of the footer's bytes, its checksum field counted as zero."""
    without = footer[:_CHECKSUM_OFFSET] + bytes(4) + footer[_CHECKSUM_OFFSET + 4 :]
    return ~sum(without) & 0xFFFFFFFF


def footer(size: int, timestamp: int, unique_id: uuid.UUID) -> bytes:
    """The footer of a fixed VHD whose data is `size` bytes (a multiple of 512), made at Unix
    time `timestamp`. The same arguments give the same bytes, so a resumed download matches."""
    if size <= 0 or size % SECTOR:
        raise ValueError(f"a VHD's data is a whole number of 512-byte sectors, not {size} bytes")
    cylinders, heads, spt = geometry(size)
    fields = [COOKIE, FEATURES, VERSION, FIXED_DATA_OFFSET, max(timestamp - EPOCH_2000, 0) & 0xFFFFFFFF,
              CREATOR_APP, CREATOR_VERSION, CREATOR_HOST, size, size, cylinders, heads, spt, DISK_TYPE_FIXED, 0,
              unique_id.bytes, 0]  # fmt: skip
    raw = _LAYOUT.pack(*fields)
    return raw[:_CHECKSUM_OFFSET] + struct.pack(">I", checksum(raw)) + raw[_CHECKSUM_OFFSET + 4 :]
