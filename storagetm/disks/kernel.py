"""Disks from the kernel's own uevent and sysfs, before udev has run its rules.

The kernel announces a disk some 100 ms (under TCG) before udev has probed it. For the buses
where udev's identity is only sysfs read back, `disk_from_sysfs` computes serial, model and WWN
the way systemd's 60-persistent-storage.rules and its builtins do, so the NQN is the one udev's
path gives: virtio-blk (`$attr{serial}`), NVMe (`$attr{serial}`, `$attr{wwid}`), libata disks
(ata_id's IDENTIFY serial, which libata also answers as VPD page 0x80) and removable USB sticks
(usb_id: the USB device's `serial`). Where udev asks the device itself (scsi_id's choice among
the page-0x83 designators for SCSI disks; ata_id through a non-removable USB bridge, which may
answer with the inner disk's serial) or names the disk by its slot (no serial: the NQN comes from
by-path), it returns None and the disk waits for udev's event, as it always did.

By-id and by-path names are never guessed here: the disk is marked `names_pending` until udev's
event brings them (see selection.plan for what that holds back).
"""

from __future__ import annotations

import os
from pathlib import Path

from storagetm.disks.disk import SECTOR, Disk, UdevDevice, gpt_partition_uuids, nvme_transport, sysfs_int, sysfs_text
from storagetm.disks.policy import VIRTUAL_PREFIXES
from storagetm.text import printable

UDEV_ALLOWED_INPUT = b"/ $%?,"  # UDEV_ALLOWED_CHARS_INPUT: what `$attr{}` keeps besides the plain set
_PLAIN = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#+-.:=@_")
_C_SPACE = b" \t\n\v\f\r"
SCSI_TYPE_ROM = "5"
ATA_SERIAL_LEN = 20


# ---- udev's string handling (src/shared/udev-util.c), on bytes as udev sees them -------------


def _utf8_length(raw: bytes, at: int) -> int:
    """Length of a valid multi-byte UTF-8 character at `at`, else 1."""
    lead = raw[at]
    size = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 1
    if size == 1:
        return 1
    try:
        raw[at : at + size].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return 1
    return size if at + size <= len(raw) else 1


def udev_replace_chars(raw: bytes, allow: bytes = b"") -> bytes:
    """udev_replace_chars(): plain ASCII, `allow`, \\x escapes and valid UTF-8 stay; whitespace
    becomes a space where a space is allowed; anything else becomes '_'."""
    out = bytearray()
    at = 0
    while at < len(raw):
        byte = raw[at]
        if byte in _PLAIN or byte in allow:
            out.append(byte)
            at += 1
        elif raw[at : at + 2] == b"\\x":
            out += b"\\x"
            at += 2
        elif (size := _utf8_length(raw, at)) > 1:
            out += raw[at : at + size]
            at += size
        else:
            out.append(0x20 if byte in _C_SPACE and 0x20 in allow else 0x5F)
            at += 1
    return bytes(out)


def udev_replace_whitespace(raw: bytes) -> bytes:
    """udev_replace_whitespace(): no leading or trailing whitespace, each inner run one '_'."""
    return b"_".join(raw.split())


def udev_attr(raw: bytes) -> str:
    """What a rule's `$attr{…}` gives: trailing whitespace dropped, odd characters replaced."""
    return udev_replace_chars(raw.rstrip(b" \t\n\r"), UDEV_ALLOWED_INPUT).decode(errors="replace")


def udev_serial(raw: bytes) -> str:
    """ata_id's and usb_id's ID_SERIAL_SHORT from the raw serial."""
    return udev_replace_chars(udev_replace_whitespace(raw)).decode(errors="replace")


def _raw(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)


# ---- serial and WWN per bus -------------------------------------------------------------


def _usb_device(device_dir: Path) -> Path | None:
    """The USB device (the ancestor with idVendor) a SCSI disk hangs off, or None."""
    for parent in (device_dir, *device_dir.parents):
        if (parent / "idVendor").exists() and (parent / "busnum").exists():
            return parent
        if parent == Path("/sys/devices") or parent.name == "devices":
            break
    return None


def _naa_wwn(wwid: str) -> str:
    """ata_id's ID_WWN (0x%llx of IDENTIFY words 108-111), which libata also answers as the NAA
    designator of VPD page 0x83, which the kernel shows as `wwid` "naa.<16 hex digits>"."""
    if not wwid.startswith("naa.") or len(wwid) != 20:
        return ""
    try:
        return f"0x{int(wwid[4:], 16):x}"
    except ValueError:
        return ""


def _ata_serial(device_dir: Path) -> str | None:
    page = _raw(device_dir / "vpd_pg80")
    if page is None or len(page) < 4 or page[1] != 0x80:
        return None
    return udev_serial(page[4 : 4 + min(page[3], ATA_SERIAL_LEN)])


def _usb_serial(usb: Path) -> str:
    raw = (_raw(usb / "serial") or b"").rstrip(b"\n")
    if any(byte < 0x20 or byte > 0x7F or byte == 0x2C for byte in raw):  # usb_id refuses such serials
        return ""
    return udev_serial(raw)


def _scsi_identity(sys_path: Path) -> tuple[str, str, str] | None:
    """(serial, wwn, bus) of an sd* disk where udev's would be sysfs read back, else None."""
    device_dir = (sys_path / "device").resolve()
    usb = _usb_device(device_dir)
    if usb is not None:
        # A non-removable USB disk goes through ata_id first, whose SAT pass-through may answer
        # with the inner disk's serial: only udev can tell.
        if sysfs_int(str(sys_path / "removable")) != 1:
            return None
        return _usb_serial(usb), "", "usb"
    # libata's own translation only (an ataN port above it): a SAS HBA's SAT layer answers page
    # 0x80 its own way, while ata_id asks the disk through it.
    libata = any(part.startswith("ata") and part[3:].isdigit() for part in device_dir.parts)
    if libata and sysfs_text(str(device_dir / "vendor")) == "ATA":
        serial = _ata_serial(device_dir)
        if serial is None:
            return None
        return serial, _naa_wwn(sysfs_text(str(device_dir / "wwid"))), "ata"
    return None  # scsi_id picks among the page-0x83 designators: left to udev


def _identity(sys_path: Path, name: str) -> tuple[str, str, str] | None:
    """(serial, wwn, bus) as udev's rules would make them, or None where only udev can tell."""
    if name.startswith("vd"):
        # udev sets no ID_SERIAL_SHORT for virtio: today's serial is the sysfs attribute itself.
        serial = sysfs_text(str(sys_path / "device" / "serial")) or sysfs_text(str(sys_path / "serial"))
        return serial, "", "virtio"
    if name.startswith("nvme"):
        serial_raw = _raw(sys_path / "device" / "serial") or b""
        wwid_raw = _raw(sys_path / "wwid") or b""
        return udev_attr(serial_raw), udev_attr(wwid_raw), "nvme"
    if name.startswith("sd"):
        return _scsi_identity(sys_path)
    return None


# ---- the file-system label the boot-medium guard looks for ------------------------------


def media_label(devnode: str) -> str:
    """The label of an ISO 9660 or FAT file system on the whole disk, as blkid would report it
    for the guard against exporting the boot medium (policy.MEDIA_LABELS): udev's blkid runs
    only after the kernel's event, and the guard must hold from the first moment."""
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        iso = os.pread(fd, 72, 32768)  # the primary volume descriptor, sector 16 of 2048 bytes
        if iso[:6] == b"\x01CD001":
            return iso[40:72].decode("ascii", errors="replace").strip()
        boot = os.pread(fd, 512, 0)
    except OSError:
        return ""
    finally:
        os.close(fd)
    if len(boot) == 512 and boot[510:512] == b"\x55\xaa":
        for signature, label in ((66, 71), (38, 43)):  # FAT32, then FAT12/16: 0x29 then an 11-byte label
            if boot[signature] == 0x29:
                text = boot[label : label + 11].decode("ascii", errors="replace").strip()
                if text and text != "NO NAME":
                    return text
    return ""


# ---- the disk -----------------------------------------------------------------------------


def disk_from_sysfs(device: UdevDevice, *, partition_uuids: bool = True) -> Disk | None:
    """The disk as disk_from_udev would build it once udev has run, from the kernel's uevent and
    sysfs alone; None where its identity needs udev (see the module's docstring)."""
    sys_path = Path(device.sys_path)
    name = device.sys_name
    devnode = device.device_node or f"/dev/{name}"
    devtype = device.device_type or ""
    # Partitions, virtual and optical devices are never exported: their identity does not matter.
    cdrom = name.startswith("sr") or sysfs_text(str(sys_path / "device" / "type")) == SCSI_TYPE_ROM
    never_exported = devtype != "disk" or name.startswith(VIRTUAL_PREFIXES) or cdrom
    if never_exported:
        serial, wwn, bus = "", "", ""
    else:
        found = _identity(sys_path, name)
        if found is None or not found[0]:  # no serial: the NQN would come from udev's by-path name
            return None
        serial, wwn, bus = found
    return Disk(
        name=name,
        devnode=devnode,
        devnum=device.device_number,
        devtype=devtype,
        size=sysfs_int(str(sys_path / "size")) * SECTOR,
        model=printable(sysfs_text(str(sys_path / "device" / "model"))),
        serial=printable(serial),
        wwn=printable(wwn),
        bus=bus,
        cdrom=cdrom,
        read_only=sysfs_int(str(sys_path / "ro")) == 1,
        removable=sysfs_int(str(sys_path / "removable")) == 1,
        nvme_transport=nvme_transport(str(sys_path)) if name.startswith("nvme") else "",
        fs_label="" if never_exported else printable(media_label(devnode)),
        part_uuids=gpt_partition_uuids(devnode) if partition_uuids and devtype == "disk" and not never_exported else (),
        names_pending=True,
    )
