"""The boot media's menu comes from the UKI's own profiles (ci/boot_menu.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ci.boot_menu import MAIN_TITLE, split_profiles, write_tree

BASE = "console=ttyS0 loglevel=4"


def pe(sections: list[tuple[str, bytes]]) -> bytes:
    """A PE image with just a section table: what the menu maker reads of a UKI."""
    optional_size = 240
    table = 0x40 + 24 + optional_size
    offset = table + 40 * len(sections)
    headers, body = b"", b""
    for name, data in sections:
        headers += struct.pack("<8sIIII16x", name.encode(), len(data), 0, len(data), offset + len(body))
        body += data
    dos = b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x40)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, optional_size, 0)
    return dos + coff + b"\0" * optional_size + headers + body


UKI = pe([
    (".cmdline", f"{BASE}\0".encode()), (".linux", b"KERNEL"), (".initrd", b"SYSTEM"),
    (".profile", b"ID=main"),
    (".profile", b'ID="read-only"\nTITLE="storagetm: share the disks read-only"\n'),
    (".cmdline", f"{BASE} storagetm.mode=ro\0".encode()),
    (".profile", b"ID=secure\nTITLE=storagetm: securely\n"),
])  # fmt: skip


def test_one_entry_per_profile_in_order_with_its_command_line() -> None:
    base, menu = split_profiles(UKI)
    assert base[".linux"] == b"KERNEL" and base[".initrd"] == b"SYSTEM"
    assert [(p.id, p.title, p.cmdline) for p in menu] == [
        ("main", MAIN_TITLE, BASE),
        ("read-only", "storagetm: share the disks read-only", f"{BASE} storagetm.mode=ro"),
        ("secure", "storagetm: securely", BASE),  # no .cmdline of its own: the base one
    ]


def test_tree_boots_the_uki_kernel_and_system_with_the_first_entry_as_default(tmp_path: Path) -> None:
    uki = tmp_path / "storagetm.efi"
    uki.write_bytes(UKI)
    write_tree(uki, tmp_path / "esp")
    esp = tmp_path / "esp"
    assert (esp / "storagetm/linux").read_bytes() == b"KERNEL"
    assert (esp / "storagetm/initrd").read_bytes() == b"SYSTEM"
    entries = sorted(p.name for p in (esp / "loader/entries").iterdir())
    assert entries == ["storagetm-0-main.conf", "storagetm-1-read-only.conf", "storagetm-2-secure.conf"]
    read_only = (esp / "loader/entries/storagetm-1-read-only.conf").read_text().splitlines()
    assert "linux /storagetm/linux" in read_only and "initrd /storagetm/initrd" in read_only
    assert f"options {BASE} storagetm.mode=ro" in read_only
    loader = (esp / "loader/loader.conf").read_text().splitlines()
    assert "default storagetm-0-main.conf" in loader and "editor yes" in loader


def test_not_a_uki_is_refused() -> None:
    with pytest.raises(ValueError, match="no .initrd section"):
        split_profiles(pe([(".cmdline", b"x"), (".linux", b"K")]))
    with pytest.raises(ValueError, match="not a PE image"):
        split_profiles(b"ELF")
