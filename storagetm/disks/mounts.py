"""Which whole disks hold a mounted file system or active swap: /proc/self/mountinfo,
/proc/swaps and sysfs, followed down through partitions, dm, LUKS, md, LVM, loop files,
btrfs and overlayfs."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from msgspec import Struct

from storagetm.system.kernelfs import read_attribute

# File systems with no local disk under them.
RAM_TYPES = frozenset({"rootfs", "tmpfs", "ramfs"})
NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "ceph"})
_ESCAPE = re.compile(r"\\([0-7]{3})")


class HostPaths(Struct, frozen=True):
    """Where the kernel's views live; tests point them at temp dirs."""

    sysfs: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")
    dev: Path = Path("/dev")


class Mount(Struct, frozen=True):
    devnum: int  # st_dev; major 0 for btrfs, overlayfs, ZFS, tmpfs, …
    mountpoint: str
    fstype: str
    source: str
    options: str  # the super block's options (overlayfs: lowerdir=…,upperdir=…)


class Backing(Struct, frozen=True):
    """The whole disks under a file system; `unknown` says why they cannot be told ("" if they can)."""

    disks: frozenset[int] = frozenset()
    unknown: str = ""

    def __or__(self, other: Backing) -> Backing:
        return Backing(self.disks | other.disks, self.unknown or other.unknown)


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            devnum = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        options = rest[2] if len(rest) > 2 else ""
        mounts.append(Mount(devnum, _unescape(fields[4]), rest[0], _unescape(rest[1]), options))
    return mounts


class MountTable(Struct, frozen=True):
    """The mounts, read once for every question a plan asks of them; `unreadable` says why
    there are none if the table could not be read."""

    mounts: tuple[Mount, ...] = ()
    unreadable: str = ""


def read_mounts(paths: HostPaths) -> MountTable:
    try:
        return MountTable(tuple(parse_mountinfo(read_attribute(paths.mountinfo))))
    except OSError as exc:
        return MountTable(unreadable=f"{paths.mountinfo} cannot be read ({exc.strerror})")


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount `path` is on: the longest mount point above it, the last one mounted there."""
    best: Mount | None = None
    for mount in mounts:
        top = mount.mountpoint.rstrip("/")
        if (path == mount.mountpoint or path.startswith(top + "/")) and (
            best is None or len(mount.mountpoint) >= len(best.mountpoint)
        ):
            best = mount
    return best


# ---- sysfs ------------------------------------------------------------------------------


def sys_dev(devnum: int, sysfs: Path) -> Path:
    return sysfs / "dev" / "block" / f"{os.major(devnum)}:{os.minor(devnum)}"


def read_devnum(path: Path) -> int | None:
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
        node = sys_dev(current, sysfs)
        if not node.exists():
            continue
        node = node.resolve()
        if (node / "partition").exists():
            parent = read_devnum(node.parent / "dev")
            if parent is not None:
                todo.append(parent)
            continue
        slaves = sorted((node / "slaves").glob("*")) if (node / "slaves").is_dir() else []
        if slaves:
            for slave in slaves:
                slave_dev = read_devnum(slave / "dev")
                if slave_dev is not None:
                    todo.append(slave_dev)
        else:
            result.add(current)
    return result


def source_devnum(source: str, paths: HostPaths) -> int | None:
    """The block device a mount source or swap file name names (/dev/sda2, /dev/mapper/x)."""
    if not source.startswith("/dev/"):
        return None
    node = os.path.realpath(paths.dev / source.removeprefix("/dev/"))
    try:
        st = os.stat(node)
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev
    except OSError:
        pass
    return read_devnum(paths.sysfs / "class" / "block" / os.path.basename(node) / "dev")


# ---- from a mount to its disks ----------------------------------------------------------


def backing(mount: Mount, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount] = frozenset()) -> Backing:
    """The disks behind a mount. sysfs changes under the walk (a loop device detached, a btrfs
    unmounted between two reads): then it cannot tell, which fails closed, and never raises."""
    try:
        return _backing(mount, mounts, paths, seen)
    except OSError as exc:
        return Backing(unknown=f"{mount.fstype} on {mount.mountpoint} changed while it was read ({exc.strerror})")


def _backing(mount: Mount, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount]) -> Backing:
    if mount in seen:
        return Backing(unknown=f"{mount.fstype} on {mount.mountpoint} is layered over itself")
    seen = seen | {mount}
    if os.major(mount.devnum) != 0:
        return _block_backing(mount.devnum, mounts, paths, seen)
    if mount.fstype in RAM_TYPES or mount.fstype in NETWORK_TYPES:
        return Backing()
    if mount.fstype == "btrfs":
        return _btrfs_backing(mount, mounts, paths, seen)
    if mount.fstype == "overlay":
        return _overlay_backing(mount, mounts, paths, seen)
    if mount.fstype == "zfs":
        pool = mount.source.split("/", 1)[0]
        return Backing(unknown=f"it is on ZFS pool {pool!r}, whose disks sysfs does not show")
    return Backing(unknown=f"it is on {mount.fstype} from {mount.source!r}, which is not a block device")


def _block_backing(devnum: int, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount]) -> Backing:
    if not sys_dev(devnum, paths.sysfs).exists():
        return Backing(unknown=f"block device {os.major(devnum)}:{os.minor(devnum)} is not in sysfs")
    result = Backing()
    for disk in whole_disks_behind(devnum, paths.sysfs):
        result |= Backing(frozenset({disk}))
        # A loop device's file lives on some other file system: that one's disks too.
        backing_file = sys_dev(disk, paths.sysfs) / "loop" / "backing_file"
        if backing_file.exists():
            result |= _path_backing(backing_file.read_text().strip().removesuffix(" (deleted)"), mounts, paths, seen)
    return result


def _path_backing(path: str, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount]) -> Backing:
    mount = mount_of(path, mounts) if path.startswith("/") else None
    if mount is None:
        return Backing(unknown=f"no mount holds {path!r}")
    return backing(mount, mounts, paths, seen)


def _btrfs_backing(mount: Mount, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount]) -> Backing:
    """Every device of the file system: /sys/fs/btrfs/<fsid>/devices/ lists them by kernel name."""
    devnum = source_devnum(mount.source, paths)
    if devnum is None:
        return Backing(unknown=f"it is on btrfs from {mount.source!r}, which is not a known block device")
    name = sys_dev(devnum, paths.sysfs).resolve().name
    for devices in sorted((paths.sysfs / "fs" / "btrfs").glob("*/devices")):
        if (devices / name).exists():
            result = Backing()
            for entry in sorted(devices.iterdir()):
                member = read_devnum(entry / "dev")
                if member is None:
                    return Backing(unknown=f"btrfs device {entry.name} has no device number")
                result |= _block_backing(member, mounts, paths, seen)
            return result
    return Backing(unknown=f"btrfs device {name} is not listed under {paths.sysfs}/fs/btrfs")


def _overlay_backing(mount: Mount, mounts: list[Mount], paths: HostPaths, seen: frozenset[Mount]) -> Backing:
    layers: list[str] = []
    for option in re.split(r"(?<!\\),", mount.options):
        key, _, value = option.partition("=")
        if key in ("upperdir", "lowerdir", "lowerdir+", "datadir+"):
            layers += [layer.replace("\\:", ":") for layer in re.split(r"(?<!\\):", value) if layer]
    if not layers:
        return Backing(unknown=f"overlayfs on {mount.mountpoint} names no layers")
    result = Backing()
    for layer in layers:
        result |= _path_backing(layer, mounts, paths, seen)
    return result


# ---- what the running system uses -------------------------------------------------------


def path_backing(path: str, paths: HostPaths, table: MountTable | None = None) -> Backing:
    """The disks holding the file system `path` is on."""
    table = table or read_mounts(paths)
    if table.unreadable:
        return Backing(unknown=table.unreadable)
    return _path_backing(path, list(table.mounts), paths, frozenset())


def disks_in_use(paths: HostPaths, table: MountTable | None = None) -> dict[int, str]:
    """Whole disks with a mounted file system or active swap on them (or on a partition, or
    on dm/md over them), with what uses them. Mounts whose disks cannot be told are left out:
    the root file system's are refused elsewhere, and an exclusive open still finds most."""
    usage: dict[int, str] = {}
    mounts = list((table or read_mounts(paths)).mounts)
    for mount in mounts:
        if os.major(mount.devnum) != 0 or mount.fstype == "btrfs":
            for disk in backing(mount, mounts, paths).disks:
                usage.setdefault(disk, f"mounted at {mount.mountpoint}")
    for device in active_swap(paths):
        devnum = source_devnum(device, paths)
        for disk in whole_disks_behind(devnum, paths.sysfs) if devnum is not None else ():
            usage.setdefault(disk, "active swap")
    return usage


def active_swap(paths: HostPaths) -> list[str]:
    """Swap partitions in use (swap files are on a mounted file system, found as such)."""
    try:
        lines = read_attribute(paths.swaps).splitlines()[1:]
    except OSError:
        return []
    return [_unescape(fields[0]) for line in lines if len(fields := line.split()) >= 2 and fields[1] == "partition"]
