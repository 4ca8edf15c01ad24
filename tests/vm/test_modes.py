"""Read-only and snapshot modes: the initiator cannot change a byte of the source disk.

Both file-system disks carry an ext4 file system whose journal needs replay (the
`needs_recovery` flag is set), so mounting it must write."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.initiator import CONNECT_ALL, Remote, connected, disconnect_all, wait_address
from testbed.machine import Disk, sha256_file
from testbed.pair import BOOT_TIMEOUT, LOGS, TARGET_APPEND, Pair, vm_pair
from testbed.wait import until

pytestmark = pytest.mark.vm

MODES_APPEND = f"{TARGET_APPEND} storagetm.mode=ro,SNAP0001=snapshot,RWDISK01=rw storagetm.snapshot_size=8M"
MARKER = "storagetm forensic marker"


def ext4_image(path: Path, label: str) -> None:
    content = path.parent / f"{label}-content"
    content.mkdir(exist_ok=True)
    (content / "evidence.txt").write_text(f"{MARKER} {label}\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(content), str(path), "32M"], check=True)
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def booted_modes() -> Iterator[Pair]:
    workdir = LOGS / "test_modes"
    workdir.mkdir(parents=True, exist_ok=True)

    def with_file_systems(disks: dict[str, Disk]) -> None:
        for serial in ("RO000001", "SNAP0001"):
            ext4_image(disks[serial].path, serial)

    kinds = {"RO000001": "virtio", "SNAP0001": "virtio", "RWDISK01": "nvme"}
    with vm_pair(workdir, kinds, MODES_APPEND, prepare=with_file_systems) as pair:
        pair.initiator.sh("mkdir -p /mnt/x")
        pair.target.wait_for(r"Exported disks \(3\)", BOOT_TIMEOUT)
        yield pair


def snapshot_usage(pair: Pair) -> dict[str, Any]:
    status = json.loads(pair.target.sh("storagetm status --json"))
    usage: dict[str, Any] = next(e["snapshot_usage"] for e in status["exports"] if e["mode"] == "snapshot")
    return usage


@pytest.fixture
def modes_pair(booted_modes: Pair) -> tuple[Pair, dict[str, str]]:
    """The pair with every disk exported in its mode and connected on the initiator, whatever
    the tests before did (powered the target off, stopped storagetm, disconnected); and the
    disk files' sums at creation."""
    pair = booted_modes
    pair.ensure_serving()
    if len(connected(pair.initiator)) < 3:
        pair.initiator.sh(f"{CONNECT_ALL} -a {wait_address(pair.target, '169.254.')}")
    return pair, pair.sums


@pytest.fixture
def fresh_snapshot(modes_pair: tuple[Pair, dict[str, str]]) -> tuple[Pair, dict[str, str]]:
    """modes_pair, with a snapshot store that is not full: if a test before filled it,
    storagetm is restarted (a new snapshot, its store empty) and the initiator reconnected."""
    pair, sums = modes_pair
    if snapshot_usage(pair)["invalid"]:
        disconnect_all(pair.initiator)
        pair.target.sh("systemctl restart storagetm")
        pair.initiator.sh(f"{CONNECT_ALL} -a {wait_address(pair.target, '169.254.')}")
    return pair, sums


def remote(pair: Pair, serial: str) -> Remote:
    return next(r for r in connected(pair.initiator) if r.serial == serial)


def test_each_disk_shows_its_mode(modes_pair: tuple[Pair, dict[str, str]]) -> None:
    pair, _ = modes_pair
    status = json.loads(pair.target.sh("storagetm status --json"))
    assert {e["disk"]["serial"]: e["mode"] for e in status["exports"]} == {
        "RO000001": "ro", "SNAP0001": "snapshot", "RWDISK01": "rw"}  # fmt: skip
    screen = pair.target.console()
    assert "[read-only]" in screen and "[read-write]" in screen and "[snapshot" in screen
    assert "can READ vda; writes are refused" in screen or "can READ vda, " not in screen


def test_read_only_refuses_every_write(modes_pair: tuple[Pair, dict[str, str]]) -> None:
    pair, sums = modes_pair
    dev = "/dev/" + remote(pair, "RO000001").block
    assert pair.initiator.sh(f"sha256sum {dev}").split()[0] == sums["RO000001"]
    out, rc = pair.initiator.run(f"dd if=/dev/zero of={dev} bs=4096 count=16 oflag=direct conv=fsync")
    assert rc != 0 and "Input/output error" in out, out
    out, rc = pair.initiator.run(f"mkfs.ext4 -F -q {dev}")
    assert rc != 0, out
    out, rc = pair.initiator.run(f"mount {dev} /mnt/x")
    if rc == 0:  # the kernel may fall back to a read-only mount: then no write reached the disk either
        pair.initiator.sh("umount /mnt/x")
    pair.initiator.sh("sync; echo 3 > /proc/sys/vm/drop_caches")
    assert sha256_file(pair.disks["RO000001"].path) == sums["RO000001"]


def test_snapshot_takes_writes_in_ram_and_source_stays(fresh_snapshot: tuple[Pair, dict[str, str]]) -> None:
    pair, sums = fresh_snapshot
    dev = "/dev/" + remote(pair, "SNAP0001").block
    pair.initiator.sh(f"mount {dev} /mnt/x")  # replays the journal: writes
    assert MARKER in pair.initiator.sh("cat /mnt/x/evidence.txt")
    pair.initiator.sh("echo written-by-initiator > /mnt/x/new.txt; umount /mnt/x; echo 3 > /proc/sys/vm/drop_caches")
    pair.initiator.sh(f"e2fsck -f -n {dev}")
    pair.initiator.sh(f"mount {dev} /mnt/x")
    assert pair.initiator.sh("cat /mnt/x/new.txt") == "written-by-initiator"
    pair.initiator.sh("umount /mnt/x")
    assert sha256_file(pair.disks["SNAP0001"].path) == sums["SNAP0001"]
    status = json.loads(pair.target.sh("storagetm status --json"))
    usage = next(e["snapshot_usage"] for e in status["exports"] if e["mode"] == "snapshot")
    assert usage["used"] > 0 and usage["total"] == 8 << 20 and not usage["invalid"]
    # The store is a tmpfs of its own, the store's size, so it cannot fill /run; it holds the
    # one file under the store's loop device (kept, so a restart finds the loop device by it).
    store = next(e["backing"]["store"] for e in status["exports"] if e["mode"] == "snapshot")
    assert store.startswith("/run/storagetm/cow/"), store
    assert f"storagetm-cow {store} tmpfs" in mounts(pair) and "size=8192k" in mounts(pair), mounts(pair)
    assert pair.target.sh(f"ls -A {store}") == "store.cow"
    assert f"{store}/store.cow" in pair.target.sh("losetup --list --noheadings -O BACK-FILE")
    table = pair.target.sh("dmsetup table storagetm-snapshot-snap0001").split()
    assert table[2:3] + table[5:] == ["snapshot", "N", "32"], table  # 16 KiB chunks (docs/measurements.md, Modes)


def mounts(pair: Pair) -> str:
    """The target's mounts below /run/storagetm, as `/proc/mounts` lines."""
    return pair.target.sh("grep ' /run/storagetm' /proc/mounts || true")


def run_used(pair: Pair) -> int:
    return int(pair.target.sh("df -B1 --output=used /run | tail -n 1"))


def test_full_snapshot_fails_cleanly(fresh_snapshot: tuple[Pair, dict[str, str]]) -> None:
    pair, sums = fresh_snapshot
    dev = "/dev/" + remote(pair, "SNAP0001").block
    run_before = run_used(pair)
    since = len(pair.target.console())
    out, rc = pair.initiator.run(f"dd if=/dev/urandom of={dev} bs=1M count=24 oflag=direct conv=fsync", timeout=300)
    assert rc != 0, out
    until(lambda: snapshot_usage(pair)["invalid"], 30,
          lambda: str((snapshot_usage(pair), pair.target.sh("dmsetup status"))))  # fmt: skip
    pair.target.wait_for(r"snapshot FULL", 30, since=since)
    # The full store is its own tmpfs: /run (the state file's) did not take its 8 MiB.
    assert run_used(pair) - run_before < 4 << 20, (run_before, run_used(pair))
    # Nothing crashed: the daemon answers and the other disks still read back.
    assert json.loads(pair.target.sh("storagetm status --json"))["pid"] > 0
    rw = "/dev/" + remote(pair, "RWDISK01").block
    assert pair.initiator.sh(f"sha256sum {rw}").split()[0] == sums["RWDISK01"]
    assert sha256_file(pair.disks["SNAP0001"].path) == sums["SNAP0001"]


def nothing_left(pair: Pair) -> None:
    """No device-mapper device, store loop device or store mount of storagetm's remains."""
    assert pair.target.sh("dmsetup ls").strip() in ("", "No devices found")
    assert "store.cow" not in pair.target.sh("losetup --list --noheadings")
    assert mounts(pair) == ""
    assert "cow" not in pair.target.sh("ls -A /run/storagetm 2>/dev/null || true").split()


# A dmsetup whose `create` fails: the store's tmpfs and loop device exist by then.
FAILING_DMSETUP = (
    "mkdir -p /tmp/faultbin && printf '%s\\n' '#!/bin/sh' "
    "'[ \"$1\" = create ] && { echo injected failure >&2; exit 1; }' 'exec /usr/sbin/dmsetup \"$@\"' "
    "> /tmp/faultbin/dmsetup && chmod +x /tmp/faultbin/dmsetup"
)


def test_snapshot_refused_or_failing_leaves_nothing(modes_pair: tuple[Pair, dict[str, str]]) -> None:
    """On the real kernel: a store RAM cannot hold is refused before anything is made, and a
    `dmsetup create` that fails after the store's tmpfs and loop device exist rolls them back.
    storagetm runs by hand for each, then the service is started again."""
    pair, _ = modes_pair
    disconnect_all(pair.initiator)
    pair.target.sh("systemctl stop storagetm")
    nothing_left(pair)
    out, _ = pair.target.run("timeout 15 storagetm --snapshot --snapshot-size 100000G SNAP0001", timeout=60)
    assert "snapshot store needs 102400000 MiB of RAM, only" in out, out
    nothing_left(pair)
    pair.target.sh(FAILING_DMSETUP)
    out, _ = pair.target.run("PATH=/tmp/faultbin:$PATH timeout 15 storagetm --snapshot SNAP0001", timeout=60)
    assert "snapshot mode: dmsetup create" in out and "injected failure" in out, out
    nothing_left(pair)
    since = len(pair.target.console())
    pair.target.sh("systemctl start storagetm")
    pair.target.wait_for(r"Exported disks \(3\)", BOOT_TIMEOUT, since=since)


def test_sources_unchanged_after_shutdown(modes_pair: tuple[Pair, dict[str, str]]) -> None:
    pair, sums = modes_pair
    disconnect_all(pair.initiator)
    pair.target.sh("storagetm stop")
    nothing_left(pair)
    pair.target.stop()
    time.sleep(0.5)
    for serial in ("RO000001", "SNAP0001"):
        assert sha256_file(pair.disks[serial].path) == sums[serial]
