"""Disk values from udev devices: sysfs attributes and udev properties."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import pytest

from storagetm.cli import serve_parser, settings_from
from storagetm.config.settings import Settings
from storagetm.disks.disk import disk_from_udev, gpt_partition_uuids, nvme_transport, resolve_file
from storagetm.disks.policy import SystemFacts
from storagetm.errors import UsageError
from storagetm.selection import explicit_files, plan

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")


class FakeDevice:
    def __init__(self, sys_path: Path, node: Path) -> None:
        self.sys_path, self.sys_name, self.device_node = str(sys_path), "vdb", str(node)
        self.device_number, self.device_type = 0xFE10, "disk"
        self.properties = {"DEVLINKS": "/dev/disk/by-id/virtio-HOT00001 /dev/disk/by-path/pci-0000:00:10.0",
                           "ID_BUS": "virtio"}  # fmt: skip


def gpt_image(path: Path, partuuid: uuid.UUID) -> Path:
    """A disk image whose GPT has one partition, an ESP with the given unique GUID."""
    header = b"EFI PART" + bytes(64) + struct.pack("<QII", 2, 128, 128)
    entry = ESP_TYPE.bytes_le + partuuid.bytes_le + bytes(96)
    path.write_bytes(bytes(512) + header.ljust(512, b"\0") + entry + bytes(127 * 128))
    return path


def test_partition_guids_from_the_gpt(tmp_path: Path) -> None:
    """The boot-medium guard reads the stick's GPT itself: no udev link needed."""
    wanted = uuid.UUID("5354524d-0000-4000-8000-000000000002")
    assert gpt_partition_uuids(str(gpt_image(tmp_path / "stick.img", wanted))) == (str(wanted),)
    (tmp_path / "blank.img").write_bytes(bytes(4096))
    assert gpt_partition_uuids(str(tmp_path / "blank.img")) == ()


def test_partition_table_read_only_when_asked(tmp_path: Path) -> None:
    """Without a loader partition UUID to look for, a hotplug does not read the disk."""
    wanted = uuid.UUID("5354524d-0000-4000-8000-000000000002")
    node = gpt_image(tmp_path / "stick.img", wanted)
    sysfs = tmp_path / "vdb"
    sysfs.mkdir()
    assert disk_from_udev(FakeDevice(sysfs, node)).part_uuids == (str(wanted),)
    assert disk_from_udev(FakeDevice(sysfs, node), partition_uuids=False).part_uuids == ()


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


def test_nvme_transport_direct_and_through_native_multipath(tmp_path: Path) -> None:
    direct = tmp_path / "pci" / "nvme" / "nvme0" / "nvme0n1"
    (direct / "device").mkdir(parents=True)
    (direct / "device" / "transport").write_text("pcie\n")
    assert nvme_transport(str(direct)) == "pcie"
    # A fabrics namespace under nvme-subsys1, reached through two controllers.
    subsys = tmp_path / "virtual" / "nvme-subsystem" / "nvme-subsys1"
    (subsys / "nvme1n1").mkdir(parents=True)
    for controller, transport in (("nvme1", "tcp\n"), ("nvme2", "tcp\n")):
        (subsys / controller).mkdir()
        (subsys / controller / "transport").write_text(transport)
    assert nvme_transport(str(subsys / "nvme1n1")) == "tcp"
    assert nvme_transport(str(tmp_path / "missing")) == ""


def _settings_for(*argv: str) -> Settings:
    return settings_from(serve_parser().parse_args(list(argv)))[0]


def test_file_through_a_symlink_or_relative_path_is_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is exported under its real path, so its NQN is the same however it is named."""
    real = tmp_path / "images" / "disk.img"
    real.parent.mkdir()
    real.write_bytes(b"\0" * 4096)
    (tmp_path / "link.img").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    nqns = set()
    for spec in ("link.img", "images/disk.img", "./images/../link.img", str(real)):
        settings = _settings_for(spec)
        assert settings.devices == (str(real),)
        result = plan(explicit_files(settings), settings, SystemFacts(), BASE)
        assert [e.disk.devnode for e in result.exports.values()] == [str(real)], (spec, result)
        assert result.problems == []
        nqns |= set(result.exports)
    assert len(nqns) == 1


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (1000, "{f}: 1000 bytes is not a multiple of 512 (NVMe namespaces are in 512-byte blocks) "
                       "(pad it with truncate -s 1024 {f})"),
        (0, "{f}: is empty (0 bytes); an NVMe namespace needs at least one 512-byte block "
              "(give it a size, e.g. truncate -s 1G {f})"),
    ],
)  # fmt: skip
def test_file_of_no_whole_block_is_refused(tmp_path: Path, size: int, message: str) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\0" * size)
    with pytest.raises(UsageError) as raised:
        _settings_for(str(path))
    assert raised.value.one_line() == message.format(f=path)


def test_directory_or_missing_file_is_refused_and_device_names_are_left_alone(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as raised:
        _settings_for(str(tmp_path))
    assert raised.value.one_line() == (f"{tmp_path}: is a directory; storagetm exports image files and block "
                                       "devices (give an image file or a disk)")  # fmt: skip
    with pytest.raises(UsageError) as raised:
        _settings_for(str(tmp_path / "gone.img"))
    assert raised.value.one_line() == f"{tmp_path}/gone.img: no such file (give an image file or a disk)"
    # Disks that may still appear: a /dev path, a kernel name, a serial.
    assert _settings_for("/dev/disk/by-id/usb-NOT-YET", "sdq", "SERIAL9").devices == (
        "/dev/disk/by-id/usb-NOT-YET", "sdq", "SERIAL9")  # fmt: skip


def test_a_disks_kernel_name_is_not_taken_for_a_file_of_that_name(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`storagetm sda` in a directory that holds a dump named `sda` means the disk."""
    name = sorted(os.listdir("/sys/class/block"))[0]  # any block device this machine has
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"\0" * 1024)
    assert resolve_file(name) is None
    assert resolve_file(f"./{name}") == str(tmp_path / name)
