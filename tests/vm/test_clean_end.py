"""A clean end, every way: the power button, Ctrl+Alt+Del and `storagetm stop` withdraw the
exports and flush every exported disk, its volatile write cache included (QEMU's disks here
are write-back: the guest sees a write cache and must flush it), before the power goes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from testbed.initiator import CONNECT_ALL, Remote, connected, disconnect_all, wait_address
from testbed.machine import Disk
from testbed.pair import BOOT_TIMEOUT, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"VIRT0003": "virtio", "NVME0003": "nvme"}
POWER_OFF_TIMEOUT = 120  # seconds from the button to QEMU's exit under TCG
WRITE_OFFSET = 4 << 20
WRITE_SIZE = 1 << 20


def flushes(pair: Pair, disk: Disk) -> int:
    """Cache flushes the guest sent to `disk` since QEMU started (its device's block backend)."""
    stats: list[dict[str, Any]] = pair.target.qmp.cmd("query-blockstats")
    for entry in stats:
        qdev = entry.get("qdev", "")  # virtio: /machine/peripheral/ID/virtio-backend; NVMe: ID
        if disk.device_id in (qdev, *qdev.split("/")[3:4]):
            return int(entry["stats"]["flush_operations"])
    raise AssertionError(f"no block backend of {disk.device_id} in query-blockstats: {stats}")


def connect(pair: Pair, serial: str) -> Remote:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    pair.initiator.sh(f"{CONNECT_ALL} -a {wait_address(pair.target, '169.254.')}")
    return next(r for r in connected(pair.initiator) if r.serial == serial)


def write_through(pair: Pair, remote: Remote) -> str:
    """1 MiB of new bytes written by the initiator at WRITE_OFFSET, past its page cache; their sha256."""
    out = pair.initiator.sh(
        f"head -c {WRITE_SIZE} /dev/urandom > /tmp/w && sha256sum /tmp/w && "
        f"dd if=/tmp/w of=/dev/{remote.block} bs={WRITE_SIZE} seek={WRITE_OFFSET // WRITE_SIZE} oflag=direct "
        "status=none && sync"
    )
    return out.split()[0]


def on_disk(disk: Disk) -> str:
    with open(disk.path, "rb") as f:
        f.seek(WRITE_OFFSET)
        return hashlib.sha256(f.read(WRITE_SIZE)).hexdigest()


def powered_off(pair: Pair) -> int:
    """Wait for the target's QEMU to exit by itself (a power-off, or a reboot under -no-reboot)."""
    proc = pair.target.proc
    assert proc is not None
    until(lambda: proc.poll() is not None, POWER_OFF_TIMEOUT,
          f"the target was still running {POWER_OFF_TIMEOUT} s later:\n{pair.target.tail()}")  # fmt: skip
    return int(proc.returncode)


def test_storagetm_stop_flushes_every_exported_disk(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    # The kernel sends a flush only to a disk that says it has a volatile write cache (QEMU's
    # virtio disk does; its NVMe controller here reports none): those must get one.
    devnodes = {e["disk"]["serial"]: e["disk"]["devnode"] for e in
                json.loads(pair.target.sh("storagetm status --json"))["exports"]}  # fmt: skip
    cached = [serial for serial, devnode in devnodes.items() if pair.target.sh(
        f"cat /sys/block/{devnode.removeprefix('/dev/')}/queue/write_cache") == "write back"]  # fmt: skip
    assert "VIRT0003" in cached, devnodes
    before = {serial: flushes(pair, disk) for serial, disk in pair.disks.items()}
    assert "storagetm stopped" in pair.target.sh("storagetm stop")
    after = {serial: flushes(pair, disk) for serial, disk in pair.disks.items()}
    # QEMU counts the flushes of its virtio disk in query-blockstats, not those of its NVMe one.
    counted = [serial for serial in cached if pair.disks[serial].device_id.startswith("devdVIRT")]
    assert counted and all(after[serial] > before[serial] for serial in counted), (cached, before, after)
    journal = pair.target.sh("journalctl -b -u storagetm --no-pager -o cat")
    assert sum("flushed /dev/" in line for line in journal.splitlines()) >= len(pair.disks)
    assert pair.target.sh("ls /sys/kernel/config/nvmet/subsystems") == ""


def test_power_button_withdraws_flushes_and_powers_off(pair: Pair) -> None:
    remote = connect(pair, "VIRT0003")
    try:
        written = write_through(pair, remote)
        pair.target.qmp.cmd("system_powerdown")  # the ACPI power button, pressed briefly
        assert powered_off(pair) == 0
    finally:
        disconnect_all(pair.initiator)
        pair.target.stop()  # the next test boots it again
    # Printed only once every exported disk's flush succeeded (storagetm/daemon.py, farewell_line).
    assert "Stopping: exports withdrawn, disks flushed - powering off" in pair.target.console()
    assert on_disk(pair.disks["VIRT0003"]) == written


def test_ctrl_alt_del_withdraws_flushes_and_reboots(pair: Pair) -> None:
    remote = connect(pair, "NVME0003")
    try:
        written = write_through(pair, remote)
        keys = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]
        pair.target.qmp.cmd("send-key", keys=keys)
        assert powered_off(pair) == 0  # QEMU runs with -no-reboot: a reboot ends it
    finally:
        disconnect_all(pair.initiator)
        pair.target.stop()
    console = pair.target.console()
    assert "Stopping: exports withdrawn, disks flushed - rebooting" in console
    assert on_disk(pair.disks["NVME0003"]) == written


def test_power_off_key_asks_then_ends_the_same_clean_way(pair: Pair) -> None:
    pair.target.wait_for(r"Keys: m mode", BOOT_TIMEOUT)
    try:
        since = len(pair.target.console())
        pair.target.send_keys("p")
        pair.target.wait_for(r"Power off\? .*Press y", 30, since=since)
        pair.target.send_keys("y")
        assert powered_off(pair) == 0
    finally:
        pair.target.stop()
    assert "Stopping: exports withdrawn, disks flushed - powering off" in pair.target.console()
