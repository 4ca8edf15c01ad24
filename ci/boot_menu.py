"""Turn a multi-profile UKI into a systemd-boot menu: one Type #1 entry per UKI profile.

The boot media start Debian's signed kernel through Debian's shim (which firmware with
Microsoft's keys trusts) and Debian's signed systemd-boot, with the storagetm system as its
initrd: the very kernel and system inside the UKI, which itself is unsigned and so would be
refused under Secure Boot. The UKI's profiles (mkosi.uki-profiles/) are the menu: profile 0
is the default entry, and each profile's `.cmdline` is its entry's options, so the menu and
the UKI's profiles (PXE, or `@N` on the stub's command line) cannot disagree.

Usage: boot_menu.py UKI ESP_TREE   (writes storagetm/{linux,initrd} and loader/)
"""

from __future__ import annotations

import shlex
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

MENU_TIMEOUT = 5  # seconds before the default entry boots by itself
MAIN_TITLE = "storagetm: share the disks, read-write (default)"  # profile 0 has no TITLE


@dataclass(frozen=True)
class Profile:
    id: str
    title: str
    cmdline: str


def sections(image: bytes) -> list[tuple[str, bytes]]:
    """The PE image's sections, in order, as (name, contents)."""
    if image[:2] != b"MZ":
        raise ValueError("not a PE image (no MZ header)")
    (pe,) = struct.unpack_from("<I", image, 0x3C)
    if image[pe : pe + 4] != b"PE\0\0":
        raise ValueError("not a PE image (no PE signature)")
    count, optional_size = struct.unpack_from("<2xH12xH", image, pe + 4)
    table = pe + 24 + optional_size
    found = []
    for index in range(count):
        raw_name, virtual_size, raw_size, raw_offset = struct.unpack_from("<8sI4xII", image, table + 40 * index)
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        found.append((name, image[raw_offset : raw_offset + min(virtual_size, raw_size)]))
    return found


def _text(data: bytes) -> str:
    return data.rstrip(b"\0").decode().strip()


def _fields(profile_text: str) -> dict[str, str]:
    """os-release-like KEY=VALUE lines, values possibly quoted."""
    fields = {}
    for line in profile_text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = " ".join(shlex.split(value))
    return fields


def split_profiles(image: bytes) -> tuple[dict[str, bytes], list[Profile]]:
    """The base sections (before the first `.profile`) and the profiles, profile 0 first."""
    base: dict[str, bytes] = {}
    profiles: list[tuple[dict[str, str], dict[str, bytes]]] = []
    for name, data in sections(image):
        if name == ".profile":
            profiles.append((_fields(_text(data)), {}))
        elif profiles:
            profiles[-1][1][name] = data
        else:
            base.setdefault(name, data)
    for needed in (".linux", ".initrd", ".cmdline"):
        if needed not in base:
            raise ValueError(f"the UKI has no {needed} section")
    if not profiles:
        profiles.append(({"ID": "main"}, {}))
    menu = [
        Profile(
            id=fields.get("ID", f"profile{number}"),
            title=fields.get("TITLE", MAIN_TITLE if number == 0 else f"storagetm (profile {number})"),
            cmdline=_text(own.get(".cmdline", base[".cmdline"])),
        )
        for number, (fields, own) in enumerate(profiles)
    ]
    return base, menu


def entry(number: int, profile: Profile) -> str:
    return (
        f"title {profile.title}\n"
        f"sort-key storagetm-{number}\n"  # the menu keeps the UKI's profile order
        "linux /storagetm/linux\n"
        "initrd /storagetm/initrd\n"
        f"options {profile.cmdline}\n"
    )


def loader_conf(default_entry: str) -> str:
    # `editor yes`: `e` on an entry edits its options, so any storagetm.* option can be given
    # at boot (the kernel, not a UKI stub, reads them, so Secure Boot does not lock them).
    return f"timeout {MENU_TIMEOUT}\ndefault {default_entry}\neditor yes\nauto-entries no\nauto-firmware yes\n"


def write_tree(uki: Path, out: Path) -> list[Profile]:
    base, menu = split_profiles(uki.read_bytes())
    (out / "storagetm").mkdir(parents=True, exist_ok=True)
    (out / "loader" / "entries").mkdir(parents=True, exist_ok=True)
    (out / "storagetm" / "linux").write_bytes(base[".linux"])
    (out / "storagetm" / "initrd").write_bytes(base[".initrd"])
    names = [f"storagetm-{number}-{profile.id}.conf" for number, profile in enumerate(menu)]
    for number, (name, profile) in enumerate(zip(names, menu, strict=True)):
        (out / "loader" / "entries" / name).write_text(entry(number, profile))
    (out / "loader" / "loader.conf").write_text(loader_conf(names[0]))
    return menu


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for number, profile in enumerate(write_tree(Path(argv[0]), Path(argv[1]))):
        print(f"boot-menu: {number} {profile.id}: {profile.title}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
