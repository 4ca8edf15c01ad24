"""Fault injection on the real kernel: storagetm killed with SIGKILL at points across its
ownership record (start-up, a hot-plug, teardown), four disks in mixed modes, then started
again with other settings (port, authentication, modes). Each time the kernel ends up with
exactly what a clean start with the new settings makes, nothing of the old settings, and
after a stop nothing at all; an initiator connected across a crash keeps its data."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, wait_address
from testbed.machine import Disk, make_disk
from testbed.pair import BOOT_TIMEOUT, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"FLT00001": "virtio", "FLT00002": "nvme", "FLT00003": "sata", "FLT00004": "usb"}
UNIT = "faultstm"
BEFORE = "--all --auth --mode=rw,FLT00002=ro,FLT00003=snapshot,FLT00004=ro --snapshot-size=16M"
AFTER = "--all --port=5000 --mode=snapshot,FLT00001=rw,FLT00003=ro --snapshot-size=16M"
JOURNAL = "/run/storagetm/owned.jsonl"
# Everything storagetm makes in the kernel, in a form two runs can compare (no minor numbers).
KERNEL_STATE = (
    "cd /sys/kernel/config/nvmet && find . -path './ports/*/ana_groups' -prune -o -print | sort"
    " && find . -type l -printf '%p -> %l\\n' | sed 's|-> .*/|-> |' | sort"
    " && echo dm: && (dmsetup info -c --noheadings -o name 2>/dev/null | grep -v 'No devices' | sort || true)"
    " && echo loop: && losetup -l -n -O BACK-FILE | sort"
    " && echo mounts: && (findmnt -rn -o TARGET | grep /run/storagetm || true)"
)


def kernel_state(pair: Pair) -> str:
    return pair.target.sh(KERNEL_STATE)


@dataclass(frozen=True)
class Reference:
    nothing: str  # the kernel's state with no storagetm running
    after: str  # what a clean start with AFTER makes
    started: int  # records a start with BEFORE writes
    hotplugged: int  # … and a hot-plugged disk after it


def start(pair: Pair, options: str, kill_at: str = "") -> bool:
    """storagetm as a transient service; True once it said READY=1, False if it died first
    (a unit that failed is unloaded: --collect)."""
    env = f"-p Environment=STORAGETM_TEST_KILL_AT={kill_at} " if kill_at else ""
    pair.target.run(f"systemctl reset-failed {UNIT}")
    _, rc = pair.target.run(f"systemd-run --collect -u {UNIT} -p Type=notify {env}/usr/bin/storagetm {options}",
                            timeout=180)  # fmt: skip
    if rc != 0:
        until(lambda: not active(pair), 60, f"{UNIT} neither ready nor dead")
    return rc == 0


def must_start(pair: Pair, options: str, point: str = "", kill_at: str = "") -> None:
    if not start(pair, options, kill_at):
        log = pair.target.sh(f"journalctl -b --no-pager -n 40 -u {UNIT}")
        raise AssertionError(f"{point}: storagetm {options} did not start:\n{log}")


def active(pair: Pair) -> bool:
    out, _ = pair.target.run(f"systemctl is-active {UNIT}")
    return out.strip() in ("active", "activating", "deactivating")


def stop(pair: Pair) -> None:
    pair.target.run(f"systemctl stop {UNIT}", timeout=180)
    until(lambda: not active(pair), 60, f"{UNIT} did not stop")
    pair.target.run(f"systemctl reset-failed {UNIT}")


def records(pair: Pair) -> int:
    out, rc = pair.target.run(f"wc -l < {JOURNAL}")
    return int(out.strip()) if rc == 0 and out.strip() else 0


@pytest.fixture(scope="module")
def reference(booted_pair: Pair) -> Reference:
    """The kernel with no storagetm and with a clean start on AFTER, and how many records a
    start and a hot-plug with BEFORE write."""
    pair = booted_pair
    pair.target.wait_for(r"Exported disks \(4\)", BOOT_TIMEOUT)
    pair.target.sh("systemctl stop storagetm")
    nothing = kernel_state(pair)
    assert "subsystems/" not in nothing and "dm:\nloop:\nmounts:" in nothing, nothing
    must_start(pair, AFTER)
    after = kernel_state(pair)
    stop(pair)
    assert kernel_state(pair) == nothing
    must_start(pair, BEFORE)
    started = records(pair)
    hot = hot_disk(pair)
    pair.target.hotplug(hot)
    until(lambda: "FLTHOT01" in pair.target.sh("storagetm status"), 60, "hot disk not exported")
    hotplugged = records(pair)
    pair.target.unplug(hot)
    until(lambda: "FLTHOT01" not in pair.target.sh("storagetm status"), 60, "hot disk not withdrawn")
    stop(pair)
    assert kernel_state(pair) == nothing
    assert hotplugged > started > 20, (started, hotplugged)
    return Reference(nothing, after, started, hotplugged)


@pytest.fixture
def idle(pair: Pair, reference: Reference) -> Pair:
    """The pair with the image's own storagetm stopped (the `pair` fixture starts it): each
    test runs its own, as a transient service."""
    pair.target.sh("systemctl stop storagetm")
    assert kernel_state(pair) == reference.nothing
    return pair


def hot_disk(pair: Pair) -> Disk:
    hot = Disk(pair.disks["FLT00001"].path.parent / "FLTHOT01.img", "virtio", "FLTHOT01")
    if not hot.path.exists():
        make_disk(hot.path, 16 << 20, b"FLTHOT01")
    return hot


def converge_and_check(pair: Pair, reference: Reference, point: str) -> None:
    must_start(pair, AFTER, point)
    state = kernel_state(pair)
    assert state == reference.after, f"{point}: restarted with new settings\n{state}\n-- expected\n{reference.after}"
    assert "hosts/nqn" not in state and "ports/4420" not in state, point  # nothing of the old settings
    stop(pair)
    state = kernel_state(pair)
    assert state == reference.nothing, f"{point}: left after stop\n{state}"


def test_killed_during_start_up(idle: Pair, reference: Reference) -> None:
    pair = idle
    started = reference.started
    points = sorted({1, 2, 3, started // 4, started // 2, started // 2 + 1, started - 1, started})
    for point in [f"{p}" for p in points] + [f"{p}-" for p in points[1::2]]:  # `N-`: made, not yet recorded
        ready = start(pair, BEFORE, kill_at=point)
        if ready:
            stop(pair)
        assert not ready or point == str(started), f"kill point {point} of {started} was not reached"
        converge_and_check(pair, reference, f"start-up kill point {point}")


def test_killed_during_hotplug(idle: Pair, reference: Reference) -> None:
    pair = idle
    started, hotplugged = reference.started, reference.hotplugged
    hot = hot_disk(pair)
    for point in (started + 1, (started + hotplugged) // 2, hotplugged):
        must_start(pair, BEFORE, f"hot-plug kill point {point}", kill_at=str(point))
        pair.target.hotplug(hot)
        until(lambda: not active(pair), 90, f"hot-plug kill point {point} not reached")
        pair.target.unplug(hot)
        converge_and_check(pair, reference, f"hot-plug kill point {point}")


def test_killed_during_teardown(idle: Pair, reference: Reference) -> None:
    pair = idle
    started = reference.started
    for extra in (1, 8, 20):
        must_start(pair, BEFORE, f"teardown kill point +{extra}", kill_at=str(started + extra))
        pair.target.run(f"systemctl stop {UNIT}", timeout=180)
        until(lambda: not active(pair), 60, "teardown kill point not reached")
        pair.target.run(f"systemctl reset-failed {UNIT}")
        assert kernel_state(pair) != reference.nothing, f"teardown kill point +{extra}: nothing left to recover"
        converge_and_check(pair, reference, f"teardown kill point +{extra}")


def test_connected_initiator_keeps_its_data_across_a_crash(idle: Pair, reference: Reference) -> None:
    pair = idle
    must_start(pair, AFTER)
    address = wait_address(pair.target, "169.254.")
    disconnect_all(pair.initiator)
    try:
        pair.initiator.sh(f"{CONNECT_ALL} -a {address} -s 5000")
        before = {r.serial: pair.initiator.sh(f"sha256sum /dev/{r.block}", timeout=300).split()[0]
                  for r in connected(pair.initiator)}  # fmt: skip
        assert sorted(before) == sorted(DISKS)
        pair.target.sh(f"systemctl kill -s KILL {UNIT}")
        until(lambda: not active(pair), 60, "storagetm not killed")
        pair.target.run(f"systemctl reset-failed {UNIT}")
        must_start(pair, AFTER, "restart after SIGKILL")  # adopts everything: the same settings
        state = kernel_state(pair)
        log = pair.target.sh(f"journalctl -b --no-pager -n 30 -u {UNIT}")
        assert state == reference.after, f"after restart:\n{state}\n-- expected\n{reference.after}\n-- log\n{log}"
        controllers = pair.initiator.sh("ls /sys/class/nvme")
        after = {r.serial: pair.initiator.sh(f"sha256sum /dev/{r.block}", timeout=300).split()[0]
                 for r in connected(pair.initiator)}  # fmt: skip
        assert after == before
        assert pair.initiator.sh("ls /sys/class/nvme") == controllers  # no reconnect was needed
        assert pair.sum_now("FLT00001") == before["FLT00001"]
    finally:
        disconnect_all(pair.initiator)
        stop(pair)
    assert kernel_state(pair) == reference.nothing


def test_record_is_private(idle: Pair, reference: Reference) -> None:
    pair = idle
    must_start(pair, BEFORE)
    try:
        mode = pair.target.sh(f"stat -c %a {JOURNAL}")
        assert mode == "600"
        assert not re.search(r"DHHC-1:", pair.target.sh(f"cat {JOURNAL}")), "a secret in the ownership record"
    finally:
        stop(pair)
