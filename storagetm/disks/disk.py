"""Block devices as seen by udev, turned into plain values."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from msgspec import Struct

from storagetm.errors import UsageError
from storagetm.system.kernelfs import read_attribute
from storagetm.text import printable

SECTOR = 512


class UdevDevice(Protocol):
    """The part of pyudev.Device we use (tests pass simple stand-ins)."""

    @property
    def sys_path(self) -> str: ...
    @property
    def sys_name(self) -> str: ...
    @property
    def device_node(self) -> str | None: ...
    @property
    def device_number(self) -> int: ...
    @property
    def device_type(self) -> str | None: ...
    @property
    def properties(self) -> Mapping[str, str]: ...


class Disk(Struct, frozen=True):
    """A block device with the identity facts storagetm needs."""

    name: str  # kernel name: sda, nvme0n1
    devnode: str  # /dev/sda, or a regular file's path
    devnum: int  # st_rdev; 0 for regular files
    devtype: str  # "disk", "partition" or "file"
    size: int  # bytes
    model: str = ""
    serial: str = ""
    wwn: str = ""
    bus: str = ""  # ID_BUS: ata, scsi, usb, nvme, virtio
    by_id: tuple[str, ...] = ()
    by_path: str = ""
    cdrom: bool = False
    read_only: bool = False
    removable: bool = False
    nvme_transport: str = ""  # pcie, tcp, rdma, fc, loop for NVMe namespaces
    fs_label: str = ""
    part_uuids: tuple[str, ...] = ()  # GPT/MBR partition UUIDs of its partitions, lower case
    # Built from the kernel's uevent and sysfs before udev named it: by_id and by_path are not
    # known yet (udev's event brings them; see storagetm/disks/kernel.py).
    names_pending: bool = False

    @property
    def is_file(self) -> bool:
        return self.devtype == "file"

    def matches(self, spec: str) -> bool:
        """True if `spec` names this disk: path, kernel name, by-id name or serial."""
        if spec in (self.devnode, self.name) or (self.serial and spec == self.serial):
            return True
        for link in self.by_id:
            if spec in (link, os.path.basename(link)):
                return True
        return bool(self.by_path) and spec == self.by_path


def sysfs_int(path: str, default: int = 0) -> int:
    try:
        return int(read_attribute(path).strip())
    except (OSError, ValueError):
        return default


def sysfs_text(path: str) -> str:
    try:
        return read_attribute(path).strip()
    except OSError:
        return ""


def nvme_transport(sys_path: str) -> str:
    """Transport of the controller(s) behind an NVMe namespace block device, "" if none."""
    base = Path(sys_path)
    direct = base / "device" / "transport"
    if direct.exists():
        return sysfs_text(str(direct))
    # Native multipath: the block device hangs off nvme-subsysN; ask its controllers.
    transports = {sysfs_text(str(p)) for p in base.parent.glob("nvme*/transport")}
    if not transports and (base / "device").exists():
        transports = {sysfs_text(str(p)) for p in (base / "device").resolve().glob("nvme*/transport")}
    return ",".join(sorted(transports - {""}))


def gpt_partition_uuids(devnode: str) -> tuple[str, ...]:
    """Unique partition GUIDs read from the disk's own GPT: known as soon as the disk is,
    before udev has made any /dev/disk/by-partuuid link."""
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        for sector in (512, 4096):
            header = os.pread(fd, 92, sector)
            if header[:8] != b"EFI PART":
                continue
            entries_lba, count, size = struct.unpack_from("<QII", header, 72)
            table = os.pread(fd, min(count, 256) * size, entries_lba * sector)
            return tuple(
                str(uuid.UUID(bytes_le=table[off + 16 : off + 32]))
                for off in range(0, len(table) - size + 1, size)
                if table[off : off + 16].strip(b"\0")
            )
    except (OSError, ValueError, struct.error):
        pass
    finally:
        os.close(fd)
    return ()


def disk_from_udev(device: UdevDevice, *, partition_uuids: bool = True) -> Disk:
    """`partition_uuids`: read the disk's GPT. Only the boot-medium check needs it, and only
    when the boot loader said which partition it booted from; the read opens a disk udev has
    just closed, so it comes from the device, on every hotplug."""
    props = device.properties
    sys_path = device.sys_path
    links = props.get("DEVLINKS", "").split()
    name = device.sys_name
    return Disk(
        name=name,
        devnode=device.device_node or f"/dev/{name}",
        devnum=device.device_number,
        devtype=device.device_type or "",
        size=sysfs_int(f"{sys_path}/size") * SECTOR,
        # What the hardware reports is shown on terminals: no control characters from here on.
        model=printable(sysfs_text(f"{sys_path}/device/model") or props.get("ID_MODEL", "").replace("_", " ").strip()),
        serial=printable(
            props.get("ID_SERIAL_SHORT", "")
            or props.get("ID_SCSI_SERIAL", "")
            or sysfs_text(f"{sys_path}/device/serial")
            or sysfs_text(f"{sys_path}/serial")
            or props.get("ID_SERIAL", "")
        ),
        wwn=printable(props.get("ID_WWN_WITH_EXTENSION", "") or props.get("ID_WWN", "")),
        bus=props.get("ID_BUS", "") or ("nvme" if name.startswith("nvme") else ""),
        by_id=tuple(sorted(printable(link) for link in links if link.startswith("/dev/disk/by-id/"))),
        by_path=printable(next((link for link in links if link.startswith("/dev/disk/by-path/")), "")),
        cdrom=props.get("ID_CDROM") == "1" or name.startswith("sr"),
        read_only=sysfs_int(f"{sys_path}/ro") == 1,
        removable=sysfs_int(f"{sys_path}/removable") == 1,
        nvme_transport=nvme_transport(sys_path) if name.startswith("nvme") else "",
        fs_label=printable(props.get("ID_FS_LABEL", "")),
        # Partition uevents carry no PARTUUID on 6.12, so sysfs cannot tell; the GPT can.
        part_uuids=gpt_partition_uuids(device.device_node or "")
        if partition_uuids and device.device_type == "disk"
        else (),
    )


def resolve_file(spec: str) -> str | None:
    """The absolute real path of a FILE argument; None if `spec` names a block device or
    is a name, serial or /dev path that may still appear. A path nvmet cannot export is a
    UsageError: a missing file, a directory, an empty file or a partial 512-byte block."""
    is_path = "/" in spec or spec.startswith(".")
    if not is_path and os.path.exists(f"/sys/class/block/{spec}"):
        return None  # a disk's kernel name, even where a file of that name lies in the directory
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        if is_path and not spec.startswith("/dev/"):
            raise UsageError(f"{spec}: no such file", hint="give an image file or a disk") from None
        return None
    except OSError as exc:
        raise UsageError(f"{spec}: {exc.strerror}") from None
    except ValueError:  # a NUL byte: no file has that name
        return None
    if stat.S_ISREG(st.st_mode):
        _check_file_size(spec, st.st_size)
        return os.path.realpath(spec)
    if stat.S_ISBLK(st.st_mode) or not is_path:
        return None
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise UsageError(f"{spec}: is {kind}; storagetm exports image files and block devices",
                     hint="give an image file or a disk")  # fmt: skip


def _check_file_size(spec: str, size: int) -> None:
    if size == 0:
        raise UsageError(f"{spec}: is empty (0 bytes); an NVMe namespace needs at least one 512-byte block",
                         hint=f"give it a size, e.g. truncate -s 1G {spec}")  # fmt: skip
    if size % SECTOR:
        padded = -(-size // SECTOR) * SECTOR
        raise UsageError(f"{spec}: {size} bytes is not a multiple of 512 (NVMe namespaces are in 512-byte blocks)",
                         hint=f"pad it with truncate -s {padded} {spec}")  # fmt: skip


def disk_from_file(path: str) -> Disk:
    """A regular file given on the command line, exported through nvmet's file backend."""
    real = os.path.realpath(path)
    st = os.stat(real)
    base = os.path.basename(real)
    return Disk(
        name=printable(base),  # shown; `devnode` is what is exported
        devnode=real,
        devnum=0,
        devtype="file",
        size=st.st_size,
        model="storagetm file",
        serial=f"{st.st_dev:x}-{st.st_ino:x}",
    )


def sort_disks(disks: Iterable[Disk]) -> list[Disk]:
    return sorted(disks, key=lambda d: (d.devtype == "file", len(d.name), d.name))
