"""What must never be exported, and why: the rules behind --list-devices."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storagetm.disks import Disk
from storagetm.firmware import EFIVARS

EFI_LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# The file-system label our ISO and ESP carry: a second guard when the firmware
# does not tell which medium it booted from.
MEDIA_LABELS = frozenset({"STORAGETM", "STORAGETM-ESP"})


class Reason(enum.Enum):
    """Why a block device is not exported. Values are shown to the operator."""

    PARTITION = "partition (whole disks only)"
    VIRTUAL = "virtual device (loop, zram, ram, dm, md, nbd)"
    OPTICAL = "optical drive"
    EMPTY = "no medium (size 0)"
    FABRICS = "NVMe namespace imported over a fabric"
    ROOT = "holds the running system's root file system"
    BOOT_MEDIUM = "the medium this system booted from"
    NOT_SELECTED = "not selected"
    BAD_OPTION = "nothing is exported while a boot option is not valid"


# Reasons that `--all` given twice lifts, as upstream does.
GUARDS = frozenset({Reason.ROOT, Reason.BOOT_MEDIUM})
VIRTUAL_PREFIXES = ("loop", "zram", "ram", "dm-", "md", "nbd")


@dataclass(frozen=True)
class SystemFacts:
    """Device numbers of the disks that hold the root file system and the boot medium."""

    root_disks: frozenset[int] = frozenset()
    boot_disks: frozenset[int] = frozenset()
    boot_partuuid: str = ""


def intrinsic_reason(disk: Disk) -> Reason | None:
    """A reason that no option can override, or None."""
    if disk.is_file:
        return None
    if disk.devtype != "disk":
        return Reason.PARTITION
    if disk.name.startswith(VIRTUAL_PREFIXES):
        return Reason.VIRTUAL
    if disk.cdrom:
        return Reason.OPTICAL
    if disk.size == 0:
        return Reason.EMPTY
    if disk.nvme_transport and disk.nvme_transport != "pcie":
        return Reason.FABRICS
    return None


def guard_reason(disk: Disk, facts: SystemFacts) -> Reason | None:
    if disk.devnum and disk.devnum in facts.root_disks:
        return Reason.ROOT
    if disk.devnum and disk.devnum in facts.boot_disks:
        return Reason.BOOT_MEDIUM
    if facts.boot_partuuid and facts.boot_partuuid in disk.part_uuids:
        return Reason.BOOT_MEDIUM
    if disk.fs_label in MEDIA_LABELS:
        return Reason.BOOT_MEDIUM
    return None


def exclusion(disk: Disk, facts: SystemFacts, *, lift_guards: bool) -> Reason | None:
    reason = intrinsic_reason(disk)
    if reason is None and not lift_guards:
        reason = guard_reason(disk, facts)
    return reason


# ---- finding the root and boot disks -------------------------------------------------


def _sys_dev(devnum: int, sysfs: Path) -> Path:
    return sysfs / "dev" / "block" / f"{os.major(devnum)}:{os.minor(devnum)}"


def _read_devnum(path: Path) -> int | None:
    try:
        major, minor = path.read_text().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def whole_disks_behind(devnum: int, sysfs: Path = Path("/sys")) -> set[int]:
    """The whole disks under a block device, through partitions, dm, LUKS, md and LVM."""
    result: set[int] = set()
    todo = [devnum]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current in seen or os.major(current) == 0:
            continue
        seen.add(current)
        node = _sys_dev(current, sysfs)
        if not node.exists():
            continue
        node = node.resolve()
        if (node / "partition").exists():
            parent = _read_devnum(node.parent / "dev")
            if parent is not None:
                todo.append(parent)
            continue
        slaves = sorted((node / "slaves").glob("*")) if (node / "slaves").is_dir() else []
        if slaves:
            for slave in slaves:
                slave_dev = _read_devnum(slave / "dev")
                if slave_dev is not None:
                    todo.append(slave_dev)
        else:
            result.add(current)
    return result


def root_disks(mountpoints: Iterable[str] = ("/", "/usr"), sysfs: Path = Path("/sys")) -> frozenset[int]:
    disks: set[int] = set()
    for mountpoint in mountpoints:
        try:
            disks |= whole_disks_behind(os.stat(mountpoint).st_dev, sysfs)
        except OSError:
            continue
    return frozenset(disks)


def loader_partuuid(efivars: Path = EFIVARS) -> str:
    """systemd-stub/-boot's LoaderDevicePartUUID: the ESP partition we were loaded from."""
    try:
        raw = (efivars / f"LoaderDevicePartUUID-{EFI_LOADER_GUID}").read_bytes()
    except OSError:
        return ""
    # 4 bytes of attributes, then a NUL-terminated UTF-16LE string.
    return raw[4:].decode("utf-16-le", errors="ignore").rstrip("\0").strip().lower()


def partuuid_disk(partuuid: str, dev: Path = Path("/dev"), sysfs: Path = Path("/sys")) -> frozenset[int]:
    if not partuuid:
        return frozenset()
    try:
        st = os.stat(dev / "disk" / "by-partuuid" / partuuid)
    except OSError:
        return frozenset()
    return frozenset(whole_disks_behind(st.st_rdev, sysfs))


def system_facts(partuuid: str | None = None) -> SystemFacts:
    """`partuuid`: the loader's, if already read; it does not change while the system runs."""
    if partuuid is None:
        partuuid = loader_partuuid()
    return SystemFacts(root_disks=root_disks(), boot_disks=partuuid_disk(partuuid), boot_partuuid=partuuid)
