"""The fixed VHD footer against the VHD specification: geometry by its CHS algorithm, the
checksum, the fixed fields; and byte ranges as RFC 9110 reads them."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from storagetm.web import vhd
from storagetm.web.ranges import Unsatisfiable, byte_range

# (size, (cylinders, heads, sectors per track)). Worked through the spec's algorithm by hand, and
# the same as `qemu-img create -f vpc -o subformat=fixed` writes for these (qemu rounds a size
# up to whole cylinders: 32M becomes 33562624, 1G 1073995776, 200M 209764352).
GEOMETRIES = [
    (33562624, (964, 4, 17)),  # 65552 sectors / 17 = 3856 cyl*heads; heads (3856+1023)//1024 = 4
    (209764352, (826, 16, 31)),  # 17: heads 24 > 16 -> 31 sectors, 16 heads: 13216 cyl*heads
    (1073995776, (2081, 16, 63)),  # 31 too: 33300 >= 16384 -> 63 sectors
    (32 << 20, (963, 4, 17)),
    (65535 * 16 * 63 * 512, (16191, 16, 255)),  # from 65535*16*63 sectors on: 255 sectors; 66059280 // 255 // 16
    (1 << 44, (65535, 16, 255)),  # beyond what CHS holds: capped
]


@pytest.mark.parametrize(("size", "chs"), GEOMETRIES)
def test_geometry_follows_the_spec(size: int, chs: tuple[int, int, int]) -> None:
    assert vhd.geometry(size) == chs


def test_the_footer_fields() -> None:
    unique = uuid.UUID("12345678-1234-5678-1234-567812345678")
    footer = vhd.footer(32 << 20, vhd.EPOCH_2000 + 1000, unique)
    assert len(footer) == 512
    (cookie, features, version, offset, stamp, app, _, host, original, current, cyl, heads, spt, kind, check,
     uid, saved) = struct.unpack(">8sIIQI4sI4sQQHBBII16sB", footer[:85])  # fmt: skip
    assert (cookie, features, version, offset) == (b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF)
    assert stamp == 1000 and app == b"stm " and host == b"Wi2k"
    assert original == current == 32 << 20 and (cyl, heads, spt) == (963, 4, 17) and kind == 2
    assert uid == unique.bytes and saved == 0 and footer[85:] == bytes(427)
    # One's complement of the byte sum without the checksum field: the whole footer then sums to 0xFFFFFFFF.
    assert check == ~(sum(footer) - sum(footer[64:68])) & 0xFFFFFFFF
    assert (sum(footer[:64]) + sum(footer[68:]) + check) & 0xFFFFFFFF == 0xFFFFFFFF


def test_a_checksum_off_by_one_byte_is_caught() -> None:
    footer = bytearray(vhd.footer(1 << 30, vhd.EPOCH_2000, uuid.UUID(int=7)))
    good = vhd.checksum(bytes(footer))
    footer[100] ^= 1
    assert vhd.checksum(bytes(footer)) != good


def test_the_footer_is_the_same_for_the_same_disk() -> None:
    assert vhd.footer(1 << 30, 1_700_000_000, uuid.UUID(int=1)) == vhd.footer(1 << 30, 1_700_000_000, uuid.UUID(int=1))


@pytest.mark.parametrize("size", [0, 1000, -512])
def test_a_partial_sector_has_no_vhd(size: int) -> None:
    with pytest.raises(ValueError, match="512-byte sectors"):
        vhd.footer(size, 0, uuid.UUID(int=0))


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)), ("bytes=-10", (990, 999)),
    ("bytes=-5000", (0, 999)), ("bytes=900-5000", (900, 999)), ("bytes=5-2", None), ("bytes=0-1,5-6", None),
    ("items=0-5", None), ("bytes=-", None),
])  # fmt: skip
def test_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(header, 1000)


def test_qemu_reads_the_vhd_as_the_disk(tmp_path: Path) -> None:
    """QEMU's own VHD reader, sizing by the footer's current size as Windows (Hyper-V) does."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed (ci/setup-host.sh installs it)")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(hashlib.shake_256(b"vhd").digest(3 << 20))
    image = tmp_path / "disk.vhd"
    image.write_bytes(raw.read_bytes() + vhd.footer(3 << 20, 1_700_000_000, uuid.UUID(int=3)))
    info = subprocess.run([qemu_img, "info", "--output=json", "-f", "vpc", str(image)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert json.loads(info.stdout)["format"] == "vpc"
    compared = subprocess.run([qemu_img, "compare", "--image-opts",
                               f"driver=vpc,force_size_calc=current_size,file.driver=file,file.filename={image}",
                               f"driver=raw,file.driver=file,file.filename={raw}"],
                              capture_output=True, text=True)  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr
