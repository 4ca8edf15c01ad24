"""Bad kernel options, and a crash of the daemon: the restarted daemon adopts the exports
and the initiator's reads go on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, wait_address
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair, exported_subsystems
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"VIRT0002": "virtio", "NVME0002": "nvme"}
# systemd's documented line, typed by hand, plus bad options that do not limit access (an
# unknown storagetm.* option would export nothing: tests/unit/test_fail_closed.py).
TARGET_APPEND = (
    f"{TARGET_APPEND} rd.systemd.unit=storage-target-mode.target ip=dhcp "
    "storagetm.disks=VIRT0002,nosuchdisk storagetm.port=abc"
)


def test_bad_kernel_options_are_named_and_only_asked_for_disks_exported(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    console = pair.target.console()
    # First on the screen; the rest of the line ("— using the default; fix the boot option") wraps.
    assert "!! storagetm.port='abc' is not valid: expects a TCP port number 1-65535" in console
    assert "no disk matches 'nosuchdisk'" in console
    status = json.loads(pair.target.sh("storagetm status --json"))
    assert [e["disk"]["serial"] for e in status["exports"]] == ["VIRT0002"]
    assert {p["trsvcid"] for p in status["ports"]} == {4420, 8009}  # the bad port fell back to the default
    assert exported_subsystems(pair.target) == [status["exports"][0]["nqn"]]


def test_sigkill_restart_adopts_exports_and_reads_go_on(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "fe80::")
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "VIRT0002")
        before = json.loads(pair.target.sh("storagetm status --json"))
        pair.target.sh("systemctl kill -s KILL storagetm.service")

        def restarted() -> dict[str, Any] | None:
            out, rc = pair.target.run("storagetm status --json")
            status: dict[str, Any] = json.loads(out) if rc == 0 else {}
            return status if status and status["pid"] != before["pid"] else None

        after = until(restarted, 60, "storagetm was not restarted")
        assert [e["nqn"] for e in after["exports"]] == [e["nqn"] for e in before["exports"]]
        assert exported_subsystems(pair.target) == [before["exports"][0]["nqn"]]
        assert "adopted" in pair.target.sh("journalctl -b -u storagetm --no-pager")
        # The initiator's connection survived: read the whole disk over it now.
        out = pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300)
        assert out.split()[0] == pair.sums["VIRT0002"]
    finally:
        disconnect_all(pair.initiator)


def test_target_reboot_keeps_nqns_and_initiator_reconnects(pair: Pair) -> None:
    """Power-cycles the target VM with the same disks and machine UUID."""
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "fe80::")
    before = json.loads(pair.target.sh("storagetm status --json"))
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "VIRT0002")
        pair.target.stop()
        pair.target.start()
        pair.target.wait_shell(BOOT_TIMEOUT)
        pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
        after = json.loads(pair.target.sh("storagetm status --json"))
        assert [e["nqn"] for e in after["exports"]] == [e["nqn"] for e in before["exports"]]
        # nvme-tcp reconnects on its own (reconnect_delay 10 s) to the same NQN.
        device = f"/sys/block/{remote.block}/device"
        states = f"cat {device}/nvme*/state {device}/state 2>/dev/null; true"
        until(lambda: "live" in pair.initiator.sh(states), 120, "the initiator did not reconnect within 120 s", 2)
        out = pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300)
        assert out.split()[0] == pair.sums["VIRT0002"]
    finally:
        disconnect_all(pair.initiator)
