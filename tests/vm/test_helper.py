"""The helper on the other machine, from the initiator VM, against an auth+TLS target: the
one-file storagetm.pyz finds the target over mDNS, connects every disk with the connection
code alone, copies each disk identical to its file on the host, resumes a copy killed
halfway, and says clearly when the target stops mid-copy, then finishes once it is back."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from testbed.initiator import Remote, connected, disconnect_all, wait_address
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"HELP0001": "virtio", "HELP0002": "nvme"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.auth=1 storagetm.tls=1"
PYZ = "python3 /usr/share/storagetm/storagetm.pyz"  # the one-file download
MIB = 1 << 20


def status(pair: Pair) -> dict[str, Any]:
    return dict(json.loads(pair.target.sh("storagetm status --json --show-secrets")))


def connection_code(pair: Pair) -> str:
    pair.target.wait_for(rf"Exported disks \({len(DISKS)}\)", BOOT_TIMEOUT)
    wait_address(pair.target, "169.254.")
    # Empty until the target has an address (after a restart the console still shows the old one).
    code = until(lambda: str(status(pair)["connection_code"]), 120, "the target shows no connection code", pause=2)
    assert code.startswith("STM1-"), code
    assert json.loads(pair.target.sh("storagetm status --json"))["connection_code"] == "(hidden)"
    return code


def helper_connect(pair: Pair) -> list[Remote]:
    """`storagetm connect -` with the code on stdin (echo is the shell's own: no process
    shows it); every disk, by serial."""
    out = pair.initiator.sh(f"echo {connection_code(pair)} | {PYZ} connect -", timeout=180)
    remotes = connected(pair.initiator)
    for remote in remotes:
        assert f"/dev/{remote.block}" in out, out
    return remotes


def by_serial(remotes: list[Remote], serial: str) -> Remote:
    return next(r for r in remotes if r.serial == serial)


def sidecar_done(pair: Pair, dest: str) -> int:
    out, rc = pair.initiator.run(f"cat {dest}.storagetm-copy")
    return int(json.loads(out)["done"]) if rc == 0 and out.startswith("{") else 0


def test_targets_finds_the_announced_target(pair: Pair) -> None:
    code = connection_code(pair)
    announced = status(pair)["announced"]
    seen = ""

    def listed() -> bool:
        nonlocal seen
        seen, _ = pair.initiator.run(f"{PYZ} targets", timeout=60)
        return announced in seen

    until(listed, 90, lambda: f"`storagetm targets` did not list {announced}:\n{seen}", pause=3)  # mDNS probing
    assert re.search(r"addresses: .*(169\.254\.|fe80::)", seen), seen
    # With the code it lists the disks too (the discovery is TLS-only: it needs the key).
    with_code = pair.initiator.sh(f"{PYZ} targets {code}", timeout=120)
    for export in status(pair)["exports"]:
        assert export["nqn"] in with_code, with_code


def test_connect_with_the_code_attaches_every_disk(pair: Pair) -> None:
    disconnect_all(pair.initiator)
    try:
        remotes = helper_connect(pair)
        assert sorted(r.serial for r in remotes) == sorted(DISKS)
        # The disks' subsystems took TLS and DH-HMAC-CHAP: this host is the only one allowed.
        assert "Handshake with" in pair.target.sh("journalctl -u tlshd --no-pager | tail -n 5")
    finally:
        pair.initiator.sh(f"{PYZ} disconnect")
    assert connected(pair.initiator) == []


def test_copy_of_each_disk_is_identical_to_the_disk_file(pair: Pair) -> None:
    remotes = helper_connect(pair)
    try:
        for serial in DISKS:
            dest = f"/var/tmp/{serial}.img"
            out = pair.initiator.sh(f"{PYZ} copy /dev/{by_serial(remotes, serial).block} {dest}", timeout=600)
            assert out.splitlines()[-1] == "identical", out
            assert pair.initiator.sh(f"sha256sum {dest}").split()[0] == pair.sum_now(serial)
            pair.initiator.sh(f"rm -f {dest} {dest}.storagetm-copy")
    finally:
        pair.initiator.sh(f"{PYZ} disconnect")


def test_a_copy_killed_halfway_resumes_and_verifies(pair: Pair) -> None:
    remotes = helper_connect(pair)
    device, dest = f"/dev/{by_serial(remotes, 'HELP0001').block}", "/var/tmp/killed.img"
    try:
        pair.initiator.sh(f"rm -f {dest} {dest}.storagetm-copy")
        # The installed command this time: the same package as the download.
        out, rc = pair.initiator.run(f"STORAGETM_TEST_COPY_KILL_AT={12 * MIB} storagetm copy {device} {dest}", 300)
        assert rc == 128 + 9, out  # SIGKILL: nothing of the copy could tidy up
        assert sidecar_done(pair, dest) == 12 * MIB
        out = pair.initiator.sh(f"storagetm copy {device} {dest}", timeout=600)
        assert out.splitlines()[-1] == "identical", out
        assert pair.initiator.sh(f"sha256sum {dest}").split()[0] == pair.sum_now("HELP0001")
    finally:
        pair.initiator.sh(f"rm -f {dest} {dest}.storagetm-copy; {PYZ} disconnect")


def test_target_stopped_mid_copy_says_so_and_the_resume_finishes(pair: Pair) -> None:
    """A clean stop withdraws the exports and forgets the secrets: the started target has a
    new code, `connect` with it replaces the controllers still trying the old one, and the
    copy, named by the disk's NQN, continues where it stopped."""
    remotes = helper_connect(pair)
    remote = by_serial(remotes, "HELP0002")
    dest = "/var/tmp/stopped.img"
    copy = f"{PYZ} copy {remote.nqn} {dest}"
    try:
        pair.initiator.sh(f"rm -f {dest} {dest}.storagetm-copy /var/tmp/stopped.out /var/tmp/stopped.rc")
        # 2 MiB/s: the 32 MiB copy runs for 16 s, long enough to stop the target under it.
        pair.initiator.sh(f"(STORAGETM_TEST_COPY_RATE={2 * MIB} {copy} >/var/tmp/stopped.out 2>&1; "
                          "echo $? >/var/tmp/stopped.rc) </dev/null >/dev/null 2>&1 & true")  # fmt: skip
        until(lambda: sidecar_done(pair, dest) > 0, 60, "the copy recorded no progress", pause=0.5)
        pair.target.sh("systemctl stop storagetm", timeout=120)
        until(lambda: pair.initiator.run("cat /var/tmp/stopped.rc")[1] == 0, 180,
              lambda: "the copy did not end after the target stopped: " + pair.initiator.run(
                  "cat /var/tmp/stopped.out")[0], pause=2)  # fmt: skip
        out = pair.initiator.sh("cat /var/tmp/stopped.out")
        assert pair.initiator.sh("cat /var/tmp/stopped.rc").strip() != "0", out
        gone = re.search(r"storagetm: target went away at offset (\d+); run the same command again to resume", out)
        assert gone, out
        assert 0 < int(gone.group(1)) < 32 * MIB and int(gone.group(1)) == sidecar_done(pair, dest)
        since = len(pair.target.console())
        pair.target.sh("systemctl start storagetm", timeout=BOOT_TIMEOUT)
        pair.target.wait_for(rf"Exported disks \({len(DISKS)}\)", BOOT_TIMEOUT, since=since)
        # The old code's controllers go on trying (ctrl_loss_tmo=-1) with the old host NQN, secret
        # and TLS key: the target, started with new ones, refuses them all.
        time.sleep(25)  # two reconnect attempts (nvme-cli's reconnect delay: 10 s)
        states = pair.initiator.sh("cat /sys/class/nvme/nvme*/state 2>/dev/null; true").split()
        assert states and "live" not in states, states
        again = helper_connect(pair)
        assert sorted(r.serial for r in again) == sorted(DISKS)
        out = pair.initiator.sh(copy, timeout=600)
        assert out.splitlines()[-1] == "identical", out
        assert pair.initiator.sh(f"sha256sum {dest}").split()[0] == pair.sum_now("HELP0002")
    finally:
        pair.initiator.sh(f"rm -f {dest} {dest}.storagetm-copy; {PYZ} disconnect")
    assert connected(pair.initiator) == []
