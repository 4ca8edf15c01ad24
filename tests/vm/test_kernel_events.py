"""Export ahead of udev: a disk hot-plugged while udev holds its events is exported from the
kernel's uevent and sysfs alone, under the NQN udev's path gives it once udev has run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testbed.machine import Disk, make_disk
from testbed.pair import BOOT_TIMEOUT, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

HOTPLUG_BOUND = 30  # seconds from QMP device_add until the disk is exported
# Every disk udev has finished with, and the NQN storagetm gives it from udev's properties
# (disk_from_udev: the path it took before it listened to the kernel's events).
UDEV_NQNS = (
    "import json, pyudev; from storagetm.disks.disk import disk_from_udev; "
    "from storagetm.disks.identity import default_nqn_base, host_identity, identity_for; "
    "base = default_nqn_base(host_identity()); "
    "print(json.dumps({d.device_node: identity_for(base, disk_from_udev(d)).nqn "
    "for d in pyudev.Context().list_devices(subsystem='block', DEVTYPE='disk') if d.is_initialized}))"
)


def exports(pair: Pair) -> dict[str, dict[str, Any]]:
    """serial -> export, as `storagetm status --json` shows them."""
    status = json.loads(pair.target.sh("storagetm status --json"))
    return {e["disk"]["serial"]: e for e in status["exports"]}


def udev_nqns(pair: Pair) -> dict[str, str]:
    return dict(json.loads(pair.target.sh(f'python3 -c "{UDEV_NQNS}"')))


def test_a_disk_is_exported_while_udev_holds_its_events(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(4\)", BOOT_TIMEOUT)
    hot = Disk(pair.disks["VIRT0001"].path.parent / "KERN0001.img", "virtio", "KERN0001")
    make_disk(hot.path, 16 << 20, b"KERN0001")
    pair.target.sh("udevadm control --stop-exec-queue")  # udevd queues events, runs no rule
    try:
        pair.target.hotplug(hot)
        early = until(lambda: exports(pair).get("KERN0001"), HOTPLUG_BOUND,
                      "the disk was not exported while udev held its events")  # fmt: skip
        # udev has not run its rules for it: no by-id link, nothing in its database.
        link = "/dev/disk/by-id/virtio-KERN0001"
        assert pair.target.run(f"test -e {link}")[1] != 0, "udev ran its rules after all"
        assert early["disk"]["names_pending"] is True, early
    finally:
        pair.target.sh("udevadm control --start-exec-queue && udevadm settle --timeout=60", timeout=90)
    try:
        until(lambda: pair.target.run(f"test -e {link}")[1] == 0, 30, f"udev made no {link}")

        def named() -> dict[str, Any] | None:
            export = exports(pair).get("KERN0001")
            return export if export and not export["disk"]["names_pending"] else None

        refined = until(named, 30, "udev's event did not reach storagetm")
        assert refined["nqn"] == early["nqn"]
        assert link in refined["disk"]["by_id"]
        # The NQN of every export, the hot-plugged disk's and the boot disks', is udev's path's.
        by_udev = udev_nqns(pair)
        for serial, export in exports(pair).items():
            assert export["nqn"] == by_udev[export["disk"]["devnode"]], (serial, export["nqn"], by_udev)
    finally:
        since = len(pair.target.console())
        pair.target.unplug(hot)
        pair.target.wait_for(r"Exported disks \(4\)", 60, since=since)
