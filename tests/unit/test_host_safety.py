"""On an ordinary Linux host: the root disk is found behind btrfs, overlayfs and dm, the
root's disks that cannot be told refuse --all, and disks in use are not exported."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from storagetm import cli
from storagetm.config.settings import Settings
from storagetm.console.screen import Screen
from storagetm.disks import identity, policy, udev
from storagetm.disks.disk import Disk
from storagetm.disks.mounts import Backing, HostPaths, disks_in_use, parse_mountinfo
from storagetm.disks.policy import (
    HELD_EXCLUSIVELY,
    LOCKED,
    Reason,
    SystemFacts,
    held_by_another,
    root_disks,
    system_facts,
)
from storagetm.disks.udev import DiskEvent
from storagetm.selection import plan
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import QueuedEvents, attached

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
SYSTEM = """\
22 1 0:21 / /proc rw,nosuid - proc proc rw
23 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
24 1 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,size=4096k
25 23 0:23 / /sys/kernel/config rw - configfs configfs rw
26 1 0:24 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
"""


class FakeHost:
    """A temp dir laid out like /sys, /dev, /proc/self/mountinfo and /proc/swaps."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(sysfs=root / "sys", mountinfo=root / "mountinfo", swaps=root / "swaps",
                               dev=root / "dev")  # fmt: skip
        for sub in ("dev/block", "class/block", "fs/btrfs"):
            (self.paths.sysfs / sub).mkdir(parents=True)
        (self.paths.dev / "mapper").mkdir(parents=True)
        self.mounts = SYSTEM
        self.paths.swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")

    def block(self, name: str, devnum: int, parent: Path | None = None, slaves: tuple[str, ...] = ()) -> Path:
        node = (parent or self.paths.sysfs / "devices" / "block") / name
        node.mkdir(parents=True)
        (node / "dev").write_text(f"{os.major(devnum)}:{os.minor(devnum)}\n")
        if parent is not None:
            (node / "partition").write_text("1\n")
        if slaves:
            (node / "slaves").mkdir()
            for slave in slaves:
                (node / "slaves" / slave).symlink_to(self.node(slave))
        (self.paths.sysfs / "dev" / "block" / f"{os.major(devnum)}:{os.minor(devnum)}").symlink_to(node)
        (self.paths.sysfs / "class" / "block" / name).symlink_to(node)
        return node

    def node(self, name: str) -> Path:
        return (self.paths.sysfs / "class" / "block" / name).resolve()

    def btrfs(self, fsid: str, *members: str) -> None:
        devices = self.paths.sysfs / "fs" / "btrfs" / fsid / "devices"
        devices.mkdir(parents=True)
        for member in members:
            (devices / member).symlink_to(self.node(member))

    def mount(self, line: str) -> None:
        self.mounts += line + "\n"
        self.paths.mountinfo.write_text(self.mounts)


def disk(name: str, minor: int) -> Disk:
    return Disk(name=name, devnode=f"/dev/{name}", devnum=os.makedev(8, minor), devtype="disk", size=1 << 30,
                model="Disk", serial=f"S-{name}")  # fmt: skip


SDA, SDB, SDC, SDD = disk("sda", 0), disk("sdb", 16), disk("sdc", 32), disk("sdd", 48)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    host = FakeHost(tmp_path)
    for d in (SDA, SDB, SDC, SDD):
        node = host.block(d.name, d.devnum)
        for n in (1, 2):
            host.block(f"{d.name}{n}", d.devnum + n, parent=node)
    return host


def exported(facts: SystemFacts, settings: Settings, **kw: object) -> list[str]:
    result = plan([SDA, SDB, SDC, SDD], settings, facts, BASE, **kw)  # type: ignore[arg-type]
    return sorted(e.disk.name for e in result.exports.values())


def test_btrfs_root_spanning_two_disks(host: FakeHost) -> None:
    """st_dev of a btrfs / is 0:N: every device of the file system is a root disk."""
    host.btrfs("0b1d0000-0000-4000-8000-000000000001", "sda2", "sdb")
    host.mount("1 0 0:31 /@ / rw,relatime - btrfs /dev/sda2 rw,subvol=/@")
    assert root_disks(paths=host.paths).disks == {SDA.devnum, SDB.devnum}
    facts = system_facts("", host.paths)
    assert exported(facts, Settings(all_disks=True)) == ["sdc", "sdd"]


def test_btrfs_root_on_luks(host: FakeHost) -> None:
    host.block("dm-0", os.makedev(253, 0), slaves=("sdc2",))
    (host.paths.dev / "mapper" / "root").symlink_to("../dm-0")
    host.btrfs("0b1d0000-0000-4000-8000-000000000002", "dm-0")
    host.mount("1 0 0:31 / / rw - btrfs /dev/mapper/root rw")
    assert root_disks(paths=host.paths) == Backing(frozenset({SDC.devnum}))


def test_overlayfs_root_is_its_layers_disks(host: FakeHost) -> None:
    host.mount("30 26 8:17 / /run/lower rw - ext4 /dev/sdb1 rw")
    host.mount("31 26 8:49 / /run/lower2 rw - squashfs /dev/sdd1 ro")
    layers = "lowerdir=/run/lower/a:/run/lower2,upperdir=/run/up,workdir=/run/w"
    host.mount(f"1 0 0:40 / / rw - overlay overlay rw,{layers}")
    assert root_disks(paths=host.paths).disks == {SDB.devnum, SDD.devnum}  # /run/up is on tmpfs


def test_zfs_root_refuses_all_but_named_disks(host: FakeHost) -> None:
    host.mount("1 0 0:45 / / rw - zfs rpool/ROOT/debian rw,xattr")
    facts = system_facts("", host.paths)
    assert facts.root_unknown.startswith("cannot tell which disk holds /: it is on ZFS pool 'rpool'")
    result = plan([SDA, SDB], Settings(all_disks=True), facts, BASE)
    assert result.exports == {} and {r for _, r in result.not_exported} == {Reason.ROOT_UNKNOWN}
    assert len(result.problems) == 1 and result.problems[0].endswith(
        "; not exporting any disk: name the disks to export, or give --all twice"
    )
    assert exported(facts, Settings(devices=("sdb",))) == ["sdb"]
    assert exported(facts, Settings(all_disks=True, lift_guards=True)) == ["sda", "sdb", "sdc", "sdd"]


def test_unreadable_mount_table_fails_closed(host: FakeHost) -> None:
    assert "cannot be read" in root_disks(paths=host.paths).unknown  # mountinfo was never written


def test_ram_root_as_in_the_image_changes_nothing(host: FakeHost) -> None:
    host.mount("1 0 0:2 / / rw - rootfs rootfs rw,size=1000k")
    facts = system_facts("", host.paths)
    assert (facts.root_disks, facts.root_unknown, dict(facts.in_use)) == (frozenset(), "", {})
    assert exported(facts, Settings(all_disks=True)) == ["sda", "sdb", "sdc", "sdd"]


def test_mounted_partition_and_swap_exclude_their_disks(host: FakeHost) -> None:
    host.mount("1 0 8:1 / / rw - ext4 /dev/sda1 rw")
    host.mount("40 1 8:17 / /home/my\\040files rw - xfs /dev/sdb1 rw")
    host.paths.swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n/dev/sdc2 partition 1048572 0 -2\n")
    facts = system_facts("", host.paths)
    assert facts.in_use == {SDA.devnum: "mounted at /", SDB.devnum: "mounted at /home/my files",
                            SDC.devnum: "active swap"}  # fmt: skip
    result = plan([SDA, SDB, SDC, SDD], Settings(all_disks=True), facts, BASE)
    assert [e.disk.name for e in result.exports.values()] == ["sdd"]
    shown = {d.name: result.why(d, r) for d, r in result.not_exported}
    assert shown == {"sda": Reason.ROOT.value, "sdb": "mounted at /home/my files", "sdc": "active swap"}


def test_mounted_lvm_volume_excludes_the_disk_under_it(host: FakeHost) -> None:
    host.block("dm-1", os.makedev(253, 1), slaves=("sdd",))
    host.mount("41 26 253:1 / /srv rw - ext4 /dev/mapper/vg-srv rw")
    assert disks_in_use(host.paths) == {SDD.devnum: "mounted at /srv"}


def test_named_disk_in_use_is_refused_in_one_line_unless_all_twice() -> None:
    facts = SystemFacts(in_use={SDB.devnum: "mounted at /home"})
    result = plan([SDA, SDB], Settings(devices=("sdb",)), facts, BASE)
    assert result.exports == {}
    assert result.problems == ["not exporting /dev/sdb: mounted at /home; stop using it first, "
                               "or give --all twice (exports every disk)"]  # fmt: skip
    lifted = plan([SDA, SDB], Settings(all_disks=True, lift_guards=True), facts, BASE)
    assert len(lifted.exports) == 2
    assert lifted.problems == ["exporting /dev/sdb although it is mounted at /home: --all was given twice"]


def test_disk_held_exclusively_is_not_exported_unless_already_exported() -> None:
    def held(devnode: str) -> str:
        return HELD_EXCLUSIVELY if devnode == "/dev/sdc" else ""

    assert exported(SystemFacts(), Settings(all_disks=True), held=held) == ["sda", "sdb", "sdd"]
    # Ours already (our dm-snapshot holds it), or mounted after it was exported: it stays.
    assert "sdc" in exported(SystemFacts(), Settings(all_disks=True), held=held, exported={"/dev/sdc"})


def test_held_by_another_asks_for_an_exclusive_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def busy(path: str, flags: int) -> int:
        assert flags & os.O_EXCL
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "open", busy)
    sysfs = tmp_path / "sys"
    assert held_by_another("/dev/sda", sysfs) == HELD_EXCLUSIVELY
    # Held only by a dm-snapshot a killed storagetm left: exporting again replaces it.
    (sysfs / "class" / "block" / "sda" / "holders" / "dm-3" / "dm").mkdir(parents=True)
    (sysfs / "class" / "block" / "sda" / "holders" / "dm-3" / "dm" / "name").write_text("storagetm-snapshot-x\n")
    assert held_by_another("/dev/sda", sysfs) == ""
    (sysfs / "class" / "block" / "sda" / "holders" / "dm-4" / "dm").mkdir(parents=True)
    (sysfs / "class" / "block" / "sda" / "holders" / "dm-4" / "dm" / "name").write_text("vg-home\n")
    assert held_by_another("/dev/sda", sysfs) == HELD_EXCLUSIVELY
    monkeypatch.undo()
    assert held_by_another("/dev/storagetm-no-such-disk") == ""


def test_held_by_another_sees_an_exclusive_lock(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    assert held_by_another(str(image)) == ""
    with image.open("rb") as locked:
        fcntl.flock(locked, fcntl.LOCK_EX)
        assert held_by_another(str(image)) == LOCKED


def test_list_devices_says_how_a_disk_is_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Devices:
        def enumerate(self) -> list[Disk]:
            return [SDA, SDB]

    monkeypatch.setattr(udev, "BlockDevices", Devices)  # cli imports it when it runs
    monkeypatch.setattr(policy, "system_facts", lambda: SystemFacts(in_use={SDB.devnum: "mounted at /home"}))
    monkeypatch.setattr(policy, "held_by_another", lambda devnode: HELD_EXCLUSIVELY if devnode == "/dev/sda" else "")
    monkeypatch.setattr(cli, "exported_now", set)
    monkeypatch.setattr(identity, "host_identity", lambda: "machine-id:test")
    assert cli.main(["--list-devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("/dev/sda") and lines[0].endswith(f"skip: {HELD_EXCLUSIVELY}")
    assert lines[1].startswith("/dev/sdb") and lines[1].endswith("skip: mounted at /home")


def test_list_devices_says_a_partition_or_a_virtual_device_is_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dm, part = disk("dm-0", 1 << 7), Disk(name="sda1", devnode="/dev/sda1", devnum=1, devtype="partition", size=1)

    class Devices:
        def enumerate(self) -> list[Disk]:
            return [dm, part]

    monkeypatch.setattr(udev, "BlockDevices", Devices)
    monkeypatch.setattr(policy, "system_facts", SystemFacts)
    monkeypatch.setattr(cli, "exported_now", set)
    monkeypatch.setattr(identity, "host_identity", lambda: "machine-id:test")
    assert cli.main(["--list-devices", "--json"]) == 0
    rows = {row["device"]: row["reason"] for row in json.loads(capsys.readouterr().out)}
    assert rows == {"/dev/dm-0": Reason.VIRTUAL.value, "/dev/sda1": Reason.PARTITION.value}


def test_mountinfo_fields_and_escapes() -> None:
    (mount,) = parse_mountinfo("36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:2 - ext3 /dev/root rw")
    assert (mount.devnum, mount.mountpoint, mount.fstype, mount.source) == (os.makedev(98, 0), "/mnt/a b", "ext3",
                                                                             "/dev/root")  # fmt: skip


def test_daemon_exports_a_freed_disk_on_its_next_event_and_keeps_a_later_mounted_one(tmp_path: Path) -> None:
    """An unmount changes no udev property: any event has a refused disk looked at again.
    Once exported, a disk that becomes busy is not withdrawn."""
    image = tmp_path / "vdb"
    image.write_bytes(bytes(1 << 20))
    vdb = Disk(name="vdb", devnode=str(image), devnum=os.makedev(254, 16), devtype="disk", size=1 << 20,
               serial="VDB1")  # fmt: skip
    busy = {str(image): "mounted at /mnt"}
    fake = FakeConfigfs(tmp_path / "configfs")
    daemon = attached(tmp_path, Settings(all_disks=True), fake, Screen(terminal=False),
                      held=lambda devnode: busy.get(devnode, ""))  # fmt: skip
    assert daemon._on_disk_events(QueuedEvents([DiskEvent("add", vdb)])) is True  # type: ignore[arg-type]
    assert daemon.state.exports == {}
    assert daemon.state.not_exported == [{"name": "vdb", "device": str(image), "reason": "mounted at /mnt"}]
    busy.clear()
    assert daemon._on_disk_events(QueuedEvents([DiskEvent("change", vdb)])) is True  # type: ignore[arg-type]
    assert len(daemon.state.exports) == 1
    busy[str(image)] = HELD_EXCLUSIVELY
    daemon._on_disk_events(QueuedEvents([DiskEvent("change", vdb)]))  # type: ignore[arg-type]
    assert len(daemon.state.exports) == 1
    assert daemon.reconciler is not None
    daemon.reconciler.teardown()
    assert os.listdir(fake.root / "subsystems") == []


def test_sysfs_changing_during_the_walk_fails_closed(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop device detached between two reads raises in the walk: it cannot tell, so
    `--all` exports nothing, and the daemon's loop sees no exception."""
    host.mount("1 0 0:31 /@ / rw,relatime - btrfs /dev/sda2 rw,subvol=/@")
    host.btrfs("0b1d0000-0000-4000-8000-000000000003", "sda2")

    def vanished(self: Path) -> list[Path]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(Path, "iterdir", vanished)
    found = root_disks(paths=host.paths)
    assert found.unknown and "changed while it was read" in found.unknown
