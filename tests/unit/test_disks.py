"""Disk values from udev devices: sysfs attributes and udev properties."""

from __future__ import annotations

from pathlib import Path

from storagetm.disks import disk_from_udev


class FakeDevice:
    def __init__(self, sys_path: Path, node: Path) -> None:
        self.sys_path, self.sys_name, self.device_node = str(sys_path), "vdb", str(node)
        self.device_number, self.device_type = 0xFE10, "disk"
        self.properties = {"DEVLINKS": "/dev/disk/by-id/virtio-HOT00001 /dev/disk/by-path/pci-0000:00:10.0",
                           "ID_BUS": "virtio"}  # fmt: skip


def test_disk_from_udev_reads_sysfs(tmp_path: Path) -> None:
    sysfs = tmp_path / "vdb"
    (sysfs / "device").mkdir(parents=True)
    for name, value in {"size": "32768\n", "ro": "1\n", "removable": "0\n", "serial": "HOT00001\n"}.items():
        (sysfs / name).write_text(value)
    (sysfs / "device" / "model").write_text("Virtual disk  \n")
    node = tmp_path / "vdb.img"
    node.write_bytes(bytes(8192))  # no partition table
    disk = disk_from_udev(FakeDevice(sysfs, node))
    assert (disk.name, disk.devnode, disk.size, disk.read_only, disk.removable) == ("vdb", str(node), 32768 * 512,
                                                                                     True, False)  # fmt: skip
    assert (disk.model, disk.serial, disk.bus) == ("Virtual disk", "HOT00001", "virtio")
    assert disk.by_id == ("/dev/disk/by-id/virtio-HOT00001",) and disk.by_path.endswith("pci-0000:00:10.0")
    assert disk.part_uuids == ()
    (sysfs / "size").unlink()  # an attribute the kernel does not have reads as 0, not as an error
    assert disk_from_udev(FakeDevice(sysfs, node)).size == 0
