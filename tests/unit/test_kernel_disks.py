"""Disks from the kernel's uevent and sysfs give the identity udev's path gives, for every disk
kind the VM suite attaches; the boot medium is refused from the kernel's first event on; udev's
later event only refines names."""

from __future__ import annotations

import contextlib
import os
import select
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from msgspec.structs import replace

from storagetm.backing.modes import Mode
from storagetm.config.settings import Settings
from storagetm.disks.disk import Disk, disk_from_udev
from storagetm.disks.identity import identity_for
from storagetm.disks.kernel import disk_from_sysfs, media_label, udev_attr, udev_replace_chars, udev_serial
from storagetm.disks.policy import Reason, SystemFacts, exclusion
from storagetm.disks.udev import BlockDevices
from storagetm.selection import plan
from storagetm.system import log

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
NVME_WWID = "nvme.1b36-4e564d4530303031-51454d55204e564d65204374726c-00000001"


@dataclass
class FakeDevice:
    """The part of pyudev.Device storagetm reads: from a kernel event (no udev properties) or
    from udev (its rules' properties)."""

    sys_path: str
    sys_name: str
    device_node: str
    device_number: int
    properties: Mapping[str, str] = field(default_factory=dict)
    device_type: str = "disk"
    action: str = "add"
    sequence_number: int = 0
    is_initialized: bool = True


@dataclass
class Kind:
    """One disk kind: its sysfs tree, its device node, and what udev's rules make of it."""

    name: str
    sys_path: Path
    node: Path
    devnum: int
    udev: dict[str, str]

    def kernel_device(self, action: str = "add", seqnum: int = 1) -> FakeDevice:
        return FakeDevice(str(self.sys_path), self.name, str(self.node), self.devnum, {}, action=action,
                          sequence_number=seqnum, is_initialized=False)  # fmt: skip

    def udev_device(self, action: str = "add", seqnum: int = 1) -> FakeDevice:
        return FakeDevice(str(self.sys_path), self.name, str(self.node), self.devnum, self.udev, action=action,
                          sequence_number=seqnum)  # fmt: skip


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def block(tmp_path: Path, parent: Path, name: str, devnum: int, *, removable: int = 0,
          image: bytes = bytes(65536)) -> tuple[Path, Path]:  # fmt: skip
    """/sys/…/<parent>/block/<name> with the attributes every disk has, its `device` link, and a
    disk image standing in for /dev/<name>."""
    disk = parent / "block" / name
    for attribute, value in {"size": "2097152\n", "ro": "0\n", "removable": f"{removable}\n",
                             "dev": f"{devnum >> 8}:{devnum & 0xFF}\n"}.items():  # fmt: skip
        write(disk / attribute, value)
    os.symlink(os.path.relpath(parent, disk), disk / "device")
    node = tmp_path / "dev" / name
    write(node, image)
    return disk, node


def links(*names: str) -> str:
    return " ".join(names)


def virtio(tmp_path: Path, serial: str = "VIRT0001") -> Kind:
    parent = tmp_path / "sys/devices/pci0000:00/0000:00:04.0/virtio2"
    parent.mkdir(parents=True)
    disk, node = block(tmp_path, parent, "vda", 0xFD00)
    write(disk / "serial", f"{serial}\n")
    udev = {"DEVLINKS": links("/dev/disk/by-path/pci-0000:00:04.0", "/dev/disk/by-path/virtio-pci-0000:00:04.0")}
    if serial:
        udev = {"ID_SERIAL": serial,
                "DEVLINKS": links(f"/dev/disk/by-id/virtio-{serial}", udev["DEVLINKS"])}  # fmt: skip
    return Kind("vda", disk, node, 0xFD00, udev)


def nvme(tmp_path: Path) -> Kind:
    controller = tmp_path / "sys/devices/pci0000:00/0000:00:05.0/nvme/nvme0"
    for attribute, value in {"serial": "NVME0001\n", "model": "QEMU NVMe Ctrl\n", "transport": "pcie\n",
                             "firmware_rev": "9.2.0\n"}.items():  # fmt: skip
        write(controller / attribute, value)
    # nvme0n1 sits in the controller's directory, not in a block/ subdirectory.
    disk = controller / "nvme0n1"
    for attribute, value in {"size": "2097152\n", "ro": "0\n", "removable": "0\n", "wwid": f"{NVME_WWID}\n",
                             "nsid": "1\n"}.items():  # fmt: skip
        write(disk / attribute, value)
    os.symlink("..", disk / "device")
    node = tmp_path / "dev" / "nvme0n1"
    write(node, bytes(65536))
    udev = {"ID_SERIAL_SHORT": "NVME0001", "ID_WWN": NVME_WWID, "ID_MODEL": "QEMU NVMe Ctrl",
            "ID_REVISION": "9.2.0", "ID_NSID": "1", "ID_SERIAL": "QEMU NVMe Ctrl_NVME0001_1",
            "DEVLINKS": links(f"/dev/disk/by-id/nvme-{NVME_WWID}", "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_NVME0001",
                              "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_NVME0001_1",
                              "/dev/disk/by-path/pci-0000:00:05.0-nvme-1")}  # fmt: skip
    return Kind("nvme0n1", disk, node, 0x10300, udev)


def ata(tmp_path: Path, serial: str = "SATA0001", wwid: str = "", name: str = "sda",
        port: str = "0000:00:1f.2/ata2/host1") -> Kind:  # fmt: skip
    """QEMU's ide-hd on the q35 AHCI controller, as the suite attaches it (serial, model)."""
    scsi = tmp_path / f"sys/devices/pci0000:00/{port}/target1:0:0/1:0:0:0-{name}"
    write(scsi / "vendor", "ATA     \n")
    write(scsi / "model", "STM SATA DISK   \n")
    write(scsi / "type", "0\n")
    write(scsi / "vpd_pg80", b"\x00\x80\x00\x14" + serial.encode().ljust(20))
    write(scsi / "wwid", (wwid or f"t10.ATA     STM SATA DISK                           {serial}") + "\n")
    disk, node = block(tmp_path, scsi, name, 0x800)
    short = "_".join(serial.split())
    udev = {"ID_ATA": "1", "ID_BUS": "ata", "ID_TYPE": "disk", "ID_MODEL": "STM_SATA_DISK",
            "ID_SERIAL": f"STM_SATA_DISK_{short}", "ID_SERIAL_SHORT": short,
            "DEVLINKS": links(f"/dev/disk/by-id/ata-STM_SATA_DISK_{short}", "/dev/disk/by-path/pci-0000:00:1f.2-ata-2",
                              "/dev/disk/by-path/pci-0000:00:1f.2-ata-2.0")}  # fmt: skip
    if wwid:
        udev |= {"ID_WWN": f"0x{wwid[4:]}", "ID_WWN_WITH_EXTENSION": f"0x{wwid[4:]}"}
        udev["DEVLINKS"] += f" /dev/disk/by-id/wwn-0x{wwid[4:]}"
    return Kind(name, disk, node, 0x800, udev)


def usb(tmp_path: Path, serial: str, *, removable: int, image: bytes = bytes(65536), name: str = "sdb") -> Kind:
    """QEMU's usb-storage on qemu-xhci: usb_id's serial is the USB device's."""
    device = tmp_path / f"sys/devices/pci0000:00/0000:00:02.0/usb1/1-{name}"
    for attribute, value in {"idVendor": "46f4\n", "idProduct": "0001\n", "busnum": "1\n",
                             "serial": f"{serial}\n"}.items():  # fmt: skip
        write(device / attribute, value)
    interface = device / "1-1:1.0"
    write(interface / "bInterfaceClass", "08\n")
    scsi = interface / "host2/target2:0:0/2:0:0:0"
    write(scsi / "vendor", "QEMU    \n")
    write(scsi / "model", "QEMU HARDDISK   \n")
    write(scsi / "type", "0\n")
    disk, node = block(tmp_path, scsi, name, 0x810, removable=removable, image=image)
    udev = {"ID_BUS": "usb", "ID_MODEL": "QEMU_HARDDISK", "ID_VENDOR": "QEMU",
            "ID_SERIAL": f"QEMU_QEMU_HARDDISK_{serial}", "ID_SERIAL_SHORT": serial,
            "ID_USB_SERIAL": f"QEMU_QEMU_HARDDISK_{serial}", "ID_USB_SERIAL_SHORT": serial,
            "DEVLINKS": links(f"/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_{serial}-0:0",
                              "/dev/disk/by-path/pci-0000:00:02.0-usb-0:1:1.0-scsi-0:0:0:0")}  # fmt: skip
    return Kind(name, disk, node, 0x810, udev)


def scsi_hd(tmp_path: Path) -> Kind:
    """QEMU's scsi-hd on virtio-scsi: scsi_id's serial comes from page 0x83."""
    scsi = tmp_path / "sys/devices/pci0000:00/0000:00:06.0/virtio3/host0/target0:0:0/0:0:0:0"
    write(scsi / "vendor", "QEMU    \n")
    write(scsi / "model", "QEMU HARDDISK   \n")
    write(scsi / "type", "0\n")
    write(scsi / "vpd_pg80", b"\x00\x80\x00\x08SCSI0001")
    disk, node = block(tmp_path, scsi, "sdc", 0x820)
    udev = {"ID_SCSI": "1", "ID_BUS": "scsi", "ID_MODEL": "QEMU_HARDDISK", "ID_SERIAL": "0QEMU_QEMU_HARDDISK_SCSI0001",
            "ID_SERIAL_SHORT": "SCSI0001", "ID_SCSI_SERIAL": "SCSI0001",
            "DEVLINKS": links("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_SCSI0001",
                              "/dev/disk/by-path/pci-0000:00:06.0-scsi-0:0:0:0")}  # fmt: skip
    return Kind("sdc", disk, node, 0x820, udev)


def cdrom(tmp_path: Path) -> Kind:
    scsi = tmp_path / "sys/devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0"
    write(scsi / "vendor", "QEMU    \n")
    write(scsi / "model", "QEMU DVD-ROM    \n")
    write(scsi / "type", "5\n")
    disk, node = block(tmp_path, scsi, "sr0", 0xB00, removable=1, image=iso_image("STORAGETM"))
    udev = {"ID_CDROM": "1", "ID_BUS": "ata", "ID_SERIAL": "QEMU_DVD-ROM_QM00005", "ID_SERIAL_SHORT": "QM00005",
            "ID_FS_LABEL": "STORAGETM", "DEVLINKS": links("/dev/cdrom", "/dev/disk/by-id/ata-QEMU_DVD-ROM_QM00005",
                                                          "/dev/disk/by-label/STORAGETM")}  # fmt: skip
    return Kind("sr0", disk, node, 0xB00, udev)


def iso_image(label: str, partuuid: uuid.UUID | None = None) -> bytes:
    """An ISO 9660 volume whose primary volume descriptor carries `label`; with a GPT that has
    one ESP partition, as ci/make-media.sh's ISO has."""
    image = bytearray(65536)
    image[32768:32774] = b"\x01CD001"
    image[32768 + 40 : 32768 + 72] = label.encode().ljust(32)
    if partuuid is not None:
        image[512:604] = (b"EFI PART" + bytes(64) + struct.pack("<QII", 2, 128, 128)).ljust(92, b"\0")
        image[1024:1056] = ESP_TYPE.bytes_le + partuuid.bytes_le
    return bytes(image)


def fat_image(label: str) -> bytes:
    boot = bytearray(65536)
    boot[66] = 0x29
    boot[71:82] = label.encode().ljust(11)
    boot[510:512] = b"\x55\xaa"
    return bytes(boot)


KINDS: dict[str, Callable[[Path], Kind]] = {
    "virtio-blk": virtio,
    "nvme": nvme,
    "ata": ata,
    "usb-stick": lambda tmp: usb(tmp, "STICK001", removable=1),
    "ata-with-wwn": lambda tmp: ata(tmp, "AB  CD 01", wwid="naa.5000c5000000abcd"),
}
# Where only udev can tell the identity: the disk waits for udev's event.
UDEV_ONLY: dict[str, Callable[[Path], Kind]] = {
    "usb-disk": lambda tmp: usb(tmp, "USB00001", removable=0),  # ata_id through the bridge first
    "boot-stick": lambda tmp: usb(tmp, "BOOTSTICK", removable=0),
    "scsi-hd": scsi_hd,  # scsi_id chooses among the page-0x83 designators
    "no-serial": lambda tmp: virtio(tmp, serial=""),  # its NQN comes from by-path
}


def same_identity(kernel: Disk, udev: Disk) -> None:
    assert identity_for(BASE, kernel) == identity_for(BASE, udev)
    for name in ("model", "serial", "wwn", "size", "devnum", "devtype", "read_only", "removable", "cdrom",
                 "nvme_transport", "part_uuids"):  # fmt: skip
        assert getattr(kernel, name) == getattr(udev, name), name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_kernel_path_gives_udevs_identity(tmp_path: Path, kind: str) -> None:
    disk = KINDS[kind](tmp_path)
    today = disk_from_udev(disk.udev_device())
    early = disk_from_sysfs(disk.kernel_device())
    assert early is not None and early.names_pending and early.by_id == ()
    same_identity(early, today)
    assert exclusion(early, SystemFacts(), lift_guards=False) is None
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([disk.kernel_device()]))
    first, refined = list(devices.events())
    assert first.disk == early
    # udev's event brings the names; the NQN and every identity stay.
    assert refined.disk.by_id == today.by_id and refined.disk.by_path == today.by_path
    assert not refined.disk.names_pending
    same_identity(refined.disk, today)


def test_identities_of_the_suites_disks_are_readable(tmp_path: Path) -> None:
    """The NQNs a test of the VM suite may compare with what udev's path gave before."""
    nqns = {}
    for kind in ("virtio-blk", "nvme", "ata"):
        early = disk_from_sysfs(KINDS[kind](tmp_path / kind).kernel_device())
        assert early is not None
        nqns[kind] = identity_for(BASE, early).nqn
    assert nqns == {"virtio-blk": f"{BASE}.virt0001", "nvme": f"{BASE}.qemu-nvme-ctrl-nvme0001-n1",
                    "ata": f"{BASE}.stm-sata-disk-sata0001"}  # fmt: skip


def test_an_ata_disk_behind_a_sas_controller_waits_for_udev(tmp_path: Path) -> None:
    assert disk_from_sysfs(ata(tmp_path, port="0000:00:1f.2/ata2/host1").kernel_device()) is not None
    behind = ata(tmp_path / "sas", port="0000:00:07.0/host3/port-3:0/end_device-3:0")
    assert disk_from_sysfs(behind.kernel_device()) is None


@pytest.mark.parametrize("kind", sorted(UDEV_ONLY))
def test_a_disk_only_udev_can_name_waits_for_udev(tmp_path: Path, kind: str) -> None:
    disk = UDEV_ONLY[kind](tmp_path)
    assert disk_from_sysfs(disk.kernel_device()) is None
    kernel_only = BlockDevices(object(), FakeMonitor([]), FakeMonitor([disk.kernel_device()]))
    assert list(kernel_only.events()) == []
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([disk.kernel_device()]))
    assert [e.disk for e in devices.events()] == [disk_from_udev(disk.udev_device())]


def test_an_optical_drive_is_never_exported_from_the_kernels_event(tmp_path: Path) -> None:
    drive = cdrom(tmp_path)
    early = disk_from_sysfs(drive.kernel_device())
    assert early is not None and early.cdrom
    assert exclusion(early, SystemFacts(), lift_guards=True) is Reason.OPTICAL
    assert exclusion(disk_from_udev(drive.udev_device()), SystemFacts(), lift_guards=True) is Reason.OPTICAL


def test_an_optical_drive_takes_udevs_names_without_a_warning(tmp_path: Path, logged: list[log.Record]) -> None:
    """The kernel path gives a device it never exports no identity; udev's is not a mismatch
    (the warning went to stderr of `storagetm --list-devices --json`, ahead of its JSON)."""
    drive = cdrom(tmp_path)
    devices = BlockDevices(object(), FakeMonitor([drive.udev_device()]), FakeMonitor([drive.kernel_device()]))
    first, refined = list(devices.events())
    assert first.disk.serial == "" and refined.disk.serial == "QM00005" and refined.disk.cdrom
    assert [r for r in logged if r.level >= log.WARNING] == []
    (again,) = BlockDevices(object(), FakeMonitor([]), FakeMonitor([drive.kernel_device("change", 2)])).events()
    assert again.disk.serial == ""  # nothing from udev yet
    devices.kernel_monitor.push(drive.kernel_device("change", 2))
    (changed,) = devices.events()
    assert changed.disk.serial == "QM00005" and [r for r in logged if r.level >= log.WARNING] == []


def test_a_partition_from_the_kernels_event_is_not_exported(tmp_path: Path) -> None:
    disk = virtio(tmp_path)
    part = disk.sys_path / "vda1"
    write(part / "size", "2048\n")
    event = FakeDevice(str(part), "vda1", str(disk.node), 0xFD01, device_type="partition", is_initialized=False)
    early = disk_from_sysfs(event)
    assert early is not None and exclusion(early, SystemFacts(), lift_guards=True) is Reason.PARTITION


# ---- the boot medium, from the first event on -------------------------------------------


def test_the_boot_stick_by_its_loader_partition_is_refused_from_the_kernels_event(tmp_path: Path) -> None:
    partuuid = uuid.UUID("5354524d-0000-4000-8000-000000000002")
    stick = usb(tmp_path, "STICK002", removable=1, image=iso_image("OTHER", partuuid))
    early = disk_from_sysfs(stick.kernel_device())
    assert early is not None and early.part_uuids == (str(partuuid),)
    facts = SystemFacts(boot_partuuid=str(partuuid))  # no by-partuuid link yet: boot_disks is empty
    result = plan([early], Settings(all_disks=True), facts, BASE)
    assert result.exports == {} and result.not_exported == [(early, Reason.BOOT_MEDIUM)]


@pytest.mark.parametrize("image", [iso_image("STORAGETM"), fat_image("STORAGETM")], ids=["iso9660", "fat"])
def test_the_boot_medium_by_its_label_is_refused_from_the_kernels_event(tmp_path: Path, image: bytes) -> None:
    """No loader partition UUID (booted without systemd-stub's variable): the label guards."""
    stick = usb(tmp_path, "STICK003", removable=1, image=image)
    early = disk_from_sysfs(stick.kernel_device(), partition_uuids=False)
    assert early is not None and early.fs_label == "STORAGETM"
    result = plan([early], Settings(all_disks=True), SystemFacts(), BASE)
    assert result.exports == {} and result.not_exported == [(early, Reason.BOOT_MEDIUM)]


def test_a_label_only_udev_found_still_refuses_the_disk(tmp_path: Path) -> None:
    """udev's blkid knows more file systems than the kernel path reads: its label can only
    add a reason not to export, and never takes one away."""
    disk = virtio(tmp_path)
    disk.udev["ID_FS_LABEL"] = "STORAGETM"
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([disk.kernel_device()]))
    _, refined = list(devices.events())
    assert exclusion(refined.disk, SystemFacts(), lift_guards=False) is Reason.BOOT_MEDIUM
    medium = usb(tmp_path / "m", "STICK004", removable=1, image=iso_image("STORAGETM"))
    devices = BlockDevices(object(), FakeMonitor([medium.udev_device()]), FakeMonitor([medium.kernel_device()]))
    early, refined = list(devices.events())
    assert early.disk.fs_label == refined.disk.fs_label == "STORAGETM"


def test_media_labels(tmp_path: Path) -> None:
    for name, image, label in (("iso", iso_image("STORAGETM"), "STORAGETM"), ("fat", fat_image("ESP"), "ESP"),
                               ("noname", fat_image("NO NAME"), ""), ("blank", bytes(65536), "")):  # fmt: skip
        write(tmp_path / name, image)
        assert media_label(str(tmp_path / name)) == label, name
    assert media_label(str(tmp_path / "missing")) == ""


# ---- selection by a name only udev gives ----------------------------------------------


def test_a_disk_named_by_a_by_id_name_waits_for_udev_then_is_exported(tmp_path: Path) -> None:
    disk = nvme(tmp_path)
    early = disk_from_sysfs(disk.kernel_device())
    assert early is not None
    settings = Settings(devices=("nvme-QEMU_NVMe_Ctrl_NVME0001",))
    waiting = plan([early], settings, SystemFacts(), BASE)
    assert waiting.exports == {} and waiting.not_exported == [(early, Reason.AWAITING_NAMES)]
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([disk.kernel_device()]))
    refined = list(devices.events())[-1].disk
    assert list(plan([refined], settings, SystemFacts(), BASE).exports) == [identity_for(BASE, early).nqn]


def test_a_disk_a_by_id_name_leaves_out_is_never_exported_meanwhile(tmp_path: Path) -> None:
    """With --all and a by-id mode for another disk, or a selection by by-id name of another
    disk: until udev's names come, the kernel path cannot tell, so nothing is exported."""
    early = disk_from_sysfs(ata(tmp_path).kernel_device())
    assert early is not None
    for spec in ("ata-OTHER_DISK_X", "/dev/disk/by-path/pci-0000:00:09.0"):
        assert plan([early], Settings(devices=(spec,)), SystemFacts(), BASE).exports == {}
    # Every disk, one read-only by a by-id name: which one is not known yet, so none goes out.
    every = Settings(all_disks=True, disk_modes=(("ata-STM_SATA_DISK_SATA0001", Mode.READ_ONLY),))
    assert plan([early], every, SystemFacts(), BASE).exports == {}
    refined = replace(early, names_pending=False, by_id=("/dev/disk/by-id/ata-STM_SATA_DISK_SATA0001",))
    assert plan([refined], Settings(devices=("ata-OTHER_DISK_X",)), SystemFacts(), BASE).exports == {}


def test_a_disk_named_by_what_the_kernel_knows_is_exported_at_once(tmp_path: Path) -> None:
    early = disk_from_sysfs(virtio(tmp_path).kernel_device())
    assert early is not None
    for devices in (("VIRT0001",), (early.devnode,), ("vda",), ()):
        settings = Settings(devices=devices, all_disks=not devices)
        assert list(plan([early], settings, SystemFacts(), BASE).exports) == [identity_for(BASE, early).nqn]


# ---- the two event streams --------------------------------------------------------------


class FakeMonitor:
    """A pyudev monitor's poll(), over a list; fileno() a pipe that is readable while events wait."""

    def __init__(self, queue: list[FakeDevice]) -> None:
        self.queue = list(queue)
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.queue:
            os.write(self.write_end, b"x")

    def poll(self, timeout: float = 0) -> FakeDevice | None:
        if not self.queue:
            with contextlib.suppress(BlockingIOError):
                os.read(self.read_end, 64)
            return None
        return self.queue.pop(0)

    def push(self, device: FakeDevice) -> None:
        self.queue.append(device)
        os.write(self.write_end, b"x")

    def fileno(self) -> int:
        return self.read_end

    def start(self) -> None:
        pass


def test_one_descriptor_wakes_for_either_monitor(tmp_path: Path) -> None:
    disk = virtio(tmp_path)
    udev, kernel = FakeMonitor([]), FakeMonitor([])
    devices = BlockDevices(object(), udev, kernel)
    waiter = select.epoll()
    waiter.register(devices.fileno(), select.EPOLLIN)
    assert waiter.poll(0) == []
    kernel.push(disk.kernel_device())
    assert waiter.poll(0) != []
    assert [e.action for e in devices.events()] == ["add"]
    assert waiter.poll(0) == []
    udev.push(disk.udev_device())
    assert waiter.poll(0) != []
    assert [e.action for e in devices.events()] == ["add"] and waiter.poll(0) == []
    devices.close()


def test_udevs_event_for_a_device_gone_since_is_ignored(tmp_path: Path) -> None:
    disk = virtio(tmp_path)
    udev, kernel = FakeMonitor([]), FakeMonitor([disk.kernel_device("add", 5), disk.kernel_device("remove", 6)])
    devices = BlockDevices(object(), udev, kernel)
    assert [e.action for e in devices.events()] == ["add", "remove"]
    udev.push(disk.udev_device("add", 5))  # the device is still in sysfs here, as after a re-plug
    assert list(devices.events()) == []
    # Plugged again (seqnum 7): udev's late event for the first plug changes nothing.
    kernel.push(disk.kernel_device("add", 7))
    udev.push(disk.udev_device("add", 5))
    events = list(devices.events())
    assert [e.action for e in events] == ["add"] and events[0].disk.names_pending
    udev.push(disk.udev_device("add", 7))
    assert [e.disk.names_pending for e in devices.events()] == [False]


def test_a_lost_kernel_event_is_made_up_from_udevs(tmp_path: Path) -> None:
    disk = ata(tmp_path)
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([]))
    (event,) = devices.events()
    same_identity(event.disk, disk_from_udev(disk.udev_device()))
    assert not event.disk.names_pending


def test_udev_never_changes_the_identity_of_an_export(tmp_path: Path, logged: list[log.Record]) -> None:
    disk = nvme(tmp_path)
    disk.udev["ID_SERIAL_SHORT"] = "SOMETHING-ELSE"
    devices = BlockDevices(object(), FakeMonitor([disk.udev_device()]), FakeMonitor([disk.kernel_device()]))
    first, refined = list(devices.events())
    assert identity_for(BASE, refined.disk) == identity_for(BASE, first.disk)
    warned = [r.message for r in logged if r.level >= log.WARNING]
    assert refined.disk.serial == "NVME0001" and any("SOMETHING-ELSE" in m for m in warned)


def test_enumeration_reads_sysfs_without_waiting_for_udev(tmp_path: Path) -> None:
    """At start: a disk udev has not finished is there all the same; one it has is refined;
    one only udev can name waits for its event."""
    fresh, done, later = virtio(tmp_path / "a"), ata(tmp_path / "b"), usb(tmp_path / "c", "USB00001", removable=0)

    class Context:
        def list_devices(self, subsystem: str) -> list[FakeDevice]:
            assert subsystem == "block"
            return [fresh.kernel_device(seqnum=0), done.udev_device(seqnum=0), later.kernel_device(seqnum=0)]

    devices = BlockDevices(Context(), FakeMonitor([later.udev_device(seqnum=9)]), FakeMonitor([]))
    found = {d.name: d for d in devices.enumerate()}
    assert sorted(found) == ["sda", "vda"]
    assert found["vda"].names_pending and not found["sda"].names_pending
    assert found["sda"].by_id == disk_from_udev(done.udev_device()).by_id
    assert [e.disk.name for e in devices.events()] == ["sdb"]


# ---- udev's string handling ------------------------------------------------------------


def test_udev_string_handling() -> None:
    assert udev_serial(b"  AB  CD 01   ") == "AB_CD_01"
    assert udev_replace_chars(b"a/b c,d") == b"a_b_c_d"
    assert udev_attr(b"S/N 1,2  \n") == "S/N 1,2"
    assert udev_replace_chars("über".encode()) == "über".encode()
    assert udev_replace_chars(b"\xff\\x41") == b"_\\x41"


def test_a_hidden_multipath_path_device_is_no_disk_from_either_source(tmp_path: Path) -> None:
    """Native NVMe multipath makes nvme0c0n1 beside the head nvme0n1: hidden, no device node,
    and the head's identity. Seen once as a disk, it took the head's NQN and its export failed
    ("cannot open /dev/nvme0c0n1")."""
    head = nvme(tmp_path)
    path_disk = head.sys_path.parent / "nvme0c0n1"
    for attribute, value in {"size": "2097152\n", "ro": "0\n", "removable": "0\n", "wwid": f"{NVME_WWID}\n",
                             "hidden": "1\n"}.items():  # fmt: skip
        write(path_disk / attribute, value)
    os.symlink("..", path_disk / "device")
    hidden = Kind("nvme0c0n1", path_disk, tmp_path / "dev/nvme0c0n1", 0x10301, dict(head.udev))
    kernel = FakeMonitor([hidden.kernel_device(), head.kernel_device()])
    devices = BlockDevices(object(), FakeMonitor([hidden.udev_device(), head.udev_device()]), kernel)
    assert [e.disk.name for e in devices.events()] == ["nvme0n1", "nvme0n1"]
