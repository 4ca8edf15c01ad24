"""Host safety on the real kernel: with storagetm stopped, one disk gets a mounted ext4, one
active swap, one a dm device holding it, and a hot-plugged disk a mounted btrfs (st_dev 0:N,
found through /sys/fs/btrfs). `--list-devices` says why each is not exported; restarted with
`--all`, storagetm exports only the disk nobody uses.

Needs the btrfs module in the image (mkosi.conf) and mkfs.btrfs on the host (btrfs-progs,
ci/setup-host.sh)."""

from __future__ import annotations

import json
import subprocess

import pytest

from testbed.machine import Disk
from testbed.pair import BOOT_TIMEOUT, Pair, exported_subsystems
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"MNT00001": "virtio", "SWAP0001": "virtio", "HELD0001": "virtio", "FREE0001": "virtio"}
BTRFS_SIZE = 128 << 20  # mkfs.btrfs refuses devices under ~109 MiB; the file stays sparse
SUBSYSTEMS = "/sys/kernel/config/nvmet/subsystems"


def device(pair: Pair, serial: str, timeout: float = 30) -> str:
    """The target's device node for a disk, once udev has made its by-id link."""
    out = ""

    def node() -> str:
        nonlocal out
        out, rc = pair.target.run(f"udevadm settle; readlink -e /dev/disk/by-id/virtio-{serial}")
        return out.strip() if rc == 0 and out.startswith("/dev/") else ""

    return until(node, timeout, lambda: f"no device for {serial}: {out}")


def exported_serials(pair: Pair) -> dict[str, str]:
    status = json.loads(pair.target.sh("storagetm status --json"))
    return {e["disk"]["serial"]: e["nqn"] for e in status["exports"]}


def plug_btrfs_disk(pair: Pair) -> None:
    path = pair.disks["MNT00001"].path.parent / "BTRFS001.img"
    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(BTRFS_SIZE)
    subprocess.run(["mkfs.btrfs", "-q", "-L", "STMBTRFS", str(path)], check=True, capture_output=True)
    pair.target.hotplug(Disk(path, "virtio", "BTRFS001"))


def test_disks_in_use_are_listed_with_why_and_not_exported(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(4\)", BOOT_TIMEOUT)
    nqns = exported_serials(pair)
    assert sorted(nqns) == sorted(DISKS)
    pair.target.sh("systemctl stop storagetm")
    assert exported_subsystems(pair.target) == []
    mnt, swap, held = (device(pair, serial) for serial in ("MNT00001", "SWAP0001", "HELD0001"))
    pair.target.sh(f"mkfs.ext4 -q -F {mnt} && mkdir -p /mnt/ext4 && mount {mnt} /mnt/ext4")
    pair.target.sh(f"mkswap {swap} >/dev/null && swapon {swap}")
    pair.target.sh(f"dmsetup create stm-test-hold --table \"0 $(blockdev --getsz {held}) linear {held} 0\"")
    plug_btrfs_disk(pair)
    btrfs = device(pair, "BTRFS001")
    pair.target.sh(f"mkdir -p /mnt/btrfs && mount -t btrfs {btrfs} /mnt/btrfs")
    try:
        # The case st_dev cannot tell: btrfs reports an anonymous device number.
        assert pair.target.sh("mountpoint -d /mnt/btrfs").startswith("0:")
        rows = {row["device"]: row for row in json.loads(pair.target.sh("storagetm --list-devices --json"))}
        assert rows[mnt]["reason"] == "mounted at /mnt/ext4", rows[mnt]
        assert rows[btrfs]["reason"] == "mounted at /mnt/btrfs", rows[btrfs]
        assert rows[swap]["reason"] == "active swap", rows[swap]
        assert rows[held]["reason"] == "in use by another program (held exclusively)", rows[held]
        assert rows[device(pair, "FREE0001")]["export"] is True
        text = pair.target.sh("storagetm --list-devices")
        assert "skip: mounted at /mnt/ext4" in text, text

        pair.target.sh("systemctl start storagetm")  # Type=notify: returns once it is ready
        assert sorted(exported_serials(pair)) == ["FREE0001"]
        assert exported_subsystems(pair.target) == [nqns["FREE0001"]]
        reasons = {row["name"]: row["reason"] for row in json.loads(pair.target.sh("storagetm status --json"))
                   ["not_exported"]}  # fmt: skip
        assert reasons[mnt.removeprefix("/dev/")] == "mounted at /mnt/ext4", reasons
    finally:
        pair.target.run("umount /mnt/ext4 /mnt/btrfs; swapoff -a; dmsetup remove stm-test-hold")


def test_a_disk_freed_later_is_exported_on_its_next_event(pair: Pair) -> None:
    """Mounted when storagetm starts, then unmounted: the disk's next udev event exports it."""
    mnt = device(pair, "MNT00001")
    pair.target.sh("systemctl stop storagetm")
    pair.target.sh(f"mkfs.ext4 -q -F {mnt} && mkdir -p /mnt/ext4 && mount {mnt} /mnt/ext4")
    try:
        pair.target.sh("systemctl start storagetm")
        assert "MNT00001" not in exported_serials(pair)
    finally:
        pair.target.run("umount /mnt/ext4")
    pair.target.sh("udevadm trigger --action=change /dev/disk/by-id/virtio-MNT00001")
    until(lambda: "MNT00001" in exported_serials(pair), 60, lambda: str(exported_serials(pair)))
