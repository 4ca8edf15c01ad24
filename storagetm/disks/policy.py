"""What must never be exported, and why: the rules behind --list-devices."""

from __future__ import annotations

import enum
import errno
import fcntl
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from msgspec import Struct, field

from storagetm.backing.modes import DM_PREFIX
from storagetm.disks.disk import Disk
from storagetm.disks.mounts import (
    Backing,
    HostPaths,
    MountTable,
    disks_in_use,
    path_backing,
    read_mounts,
    whole_disks_behind,
)
from storagetm.system.firmware import EFIVARS

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
    ROOT_UNKNOWN = "may hold the root file system (storagetm cannot tell which disk does)"
    IN_USE = "in use on this system"  # the plan says how: mounted at …, active swap, …
    AWAITING_NAMES = "waiting for udev's /dev/disk names (an option may name this disk by one)"


# Reasons that `--all` given twice lifts, as upstream does (in-use disks: with a warning each).
GUARDS = frozenset({Reason.ROOT, Reason.BOOT_MEDIUM, Reason.ROOT_UNKNOWN, Reason.IN_USE})
SYSTEM_MOUNTS = ("/", "/usr")
HELD_EXCLUSIVELY = "in use by another program (held exclusively)"
LOCKED = "in use by another program (locked)"
VIRTUAL_PREFIXES = ("loop", "zram", "ram", "dm-", "md", "nbd")


class SystemFacts(Struct, frozen=True):
    """Device numbers of the disks that hold the root file system and the boot medium, and
    of the disks this system uses (mounted or swap): read again for every plan."""

    root_disks: frozenset[int] = frozenset()
    boot_disks: frozenset[int] = frozenset()
    boot_partuuid: str = ""
    root_unknown: str = ""  # "cannot tell which disk holds /: …" when the root's disks cannot be told
    in_use: Mapping[int, str] = field(default_factory=dict)  # whole disk -> "mounted at /home", "active swap"


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


def unlisted_reason(disk: Disk) -> str:
    """Why a device the plan leaves off the screen (a partition, a virtual device) is not exported."""
    return (intrinsic_reason(disk) or Reason.PARTITION).value


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


def may_name_by_link(spec: str) -> bool:
    """Whether a disk option could be one of udev's /dev/disk names: a by-id name (every one
    has a "bus-" prefix: ata-, nvme-, virtio-, usb-, wwn-, …) or a /dev/disk/ path."""
    return spec.startswith("/dev/disk/") or ("/" not in spec and "-" in spec)


def awaiting_names(disk: Disk, specs: Iterable[str]) -> bool:
    """A disk seen before udev named it, while some option may name it by a name it does not
    have yet: whether it is selected, and in which mode, is not known until udev's event. It
    waits: a disk must never be exported that the options turn out to leave out."""
    return disk.names_pending and any(may_name_by_link(spec) and not disk.matches(spec) for spec in specs)


def usage(disk: Disk, facts: SystemFacts, held: Callable[[str], str]) -> str:
    """How this system uses the disk ("mounted at /home", "active swap", …), or "" if it does not."""
    if disk.is_file:
        return ""
    return facts.in_use.get(disk.devnum, "") or held(disk.devnode)


# ---- finding the root and boot disks -------------------------------------------------


def root_disks(
    mountpoints: Iterable[str] = SYSTEM_MOUNTS, paths: HostPaths | None = None, table: MountTable | None = None
) -> Backing:
    """The disks behind `/` and `/usr`, read from the mount table: st_dev says nothing on
    btrfs, ZFS or overlayfs (major 0)."""
    paths = paths or HostPaths()
    table = table or read_mounts(paths)
    result = Backing()
    for mountpoint in mountpoints:
        found = path_backing(mountpoint, paths, table)
        if found.unknown:
            found = Backing(found.disks, f"cannot tell which disk holds {mountpoint}: {found.unknown}")
        result |= found
    return result


def held_by_another(devnode: str, sysfs: Path = Path("/sys")) -> str:
    """Why another program has the disk to itself, or "". An exclusive open fails with EBUSY
    while anything is mounted from the disk or its partitions, or dm/md/ZFS sits on it."""
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        busy = exc.errno == errno.EBUSY and not held_by_our_dm(devnode, sysfs)
        return HELD_EXCLUSIVELY if busy else ""
    try:
        # Partitioning tools take this lock while they rewrite the table; udev's is shared.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return LOCKED
    finally:
        os.close(fd)
    return ""


def held_by_our_dm(devnode: str, sysfs: Path) -> bool:
    """Only storagetm's own dm devices hold the disk: left by an instance that died while
    exporting it, and replaced when it is exported again (modes.prepare)."""
    holders = sorted((sysfs / "class" / "block" / os.path.basename(devnode) / "holders").glob("*"))
    return bool(holders) and all(_text(holder / "dm" / "name").startswith(DM_PREFIX) for holder in holders)


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def nothing_held(_devnode: str) -> str:
    return ""


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


def system_facts(partuuid: str | None = None, paths: HostPaths | None = None) -> SystemFacts:
    """`partuuid`: the loader's, if already read; it does not change while the system runs."""
    paths = paths or HostPaths()
    if partuuid is None:
        partuuid = loader_partuuid()
    table = read_mounts(paths)  # once for both questions: every plan (every disk event) reads it
    root = root_disks(paths=paths, table=table)
    return SystemFacts(root_disks=root.disks, boot_disks=partuuid_disk(partuuid, sysfs=paths.sysfs),
                       boot_partuuid=partuuid, root_unknown=root.unknown,
                       in_use=disks_in_use(paths, table))  # fmt: skip
