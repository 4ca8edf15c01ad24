"""The target's keyboard (QMP send-key to tty1) drives the screen, and a mode changes live
while the initiator is connected: rw -> ro (later writes fail, the disk holds exactly what was
written before), ro -> snapshot (writes go to RAM, the disk unchanged) -> rw (the RAM store
freed, writes reach the disk again)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, screen_rows_joined, wait_address
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"VIRT0004": "virtio", "NVME0004": "nvme"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.snapshot_size=8M"  # two RAM stores in the VM's 1 GiB
SERIAL = "VIRT0004"
OFFSET, SIZE = 4 << 20, 1 << 20
SWITCH_TIMEOUT = 60  # seconds from the key to the initiator reading the disk on its new backing
STORES = "findmnt -rn -o TARGET | grep '^/run/storagetm/cow/' || true"


def press(pair: Pair, *keys: str, then: str) -> None:
    """Press `keys` on the target's keyboard and wait for `then` on its console."""
    since = len(pair.target.console())
    pair.target.send_keys(*keys)
    pair.target.wait_for(then, 30, since=since)


def modes(pair: Pair) -> set[str]:
    return {e["mode"] for e in json.loads(pair.target.sh("storagetm status --json"))["exports"]}


def block(pair: Pair) -> str:
    """The initiator's device for SERIAL, once a read of it works: a mode change offers the
    namespace anew, and the initiator rescans it."""

    def readable() -> str:
        for remote in connected(pair.initiator, settle=2):
            read = f"dd if=/dev/{remote.block} of=/dev/null bs=4096 count=1 iflag=direct status=none"
            if remote.serial == SERIAL and pair.initiator.run(read)[1] == 0:
                return remote.block
        return ""

    return until(readable, SWITCH_TIMEOUT, f"{SERIAL} did not come back on the initiator", pause=2)


def write(pair: Pair, device: str) -> tuple[int, str]:
    """1 MiB of new bytes at OFFSET, past the page cache: dd's exit status and the bytes' sha256."""
    out, rc = pair.initiator.run(
        f"head -c {SIZE} /dev/urandom > /tmp/w && sha256sum /tmp/w | cut -c1-64 && "
        f"dd if=/tmp/w of=/dev/{device} bs={SIZE} seek={OFFSET // SIZE} oflag=direct status=none && sync"
    )
    return rc, out.splitlines()[0]


def region_on_disk(pair: Pair) -> str:
    with open(pair.disks[SERIAL].path, "rb") as f:
        f.seek(OFFSET)
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def test_help_and_qr_code_show_and_any_key_goes_back(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    pair.target.wait_for(r"Keys: m mode", 30)
    press(pair, "h", then=r"storagetm keys \(the other machine")
    press(pair, "x", then=r"Keys: m mode")
    press(pair, "q", then=r"The connection details, for a phone's camera")
    assert "\u2588" in pair.target.console()  # the code itself, in block characters
    press(pair, "x", then=r"Keys: m mode")
    press(pair, "p", then=r"Power off\? .*Press y")
    press(pair, "n", then=r"Cancelled\.")
    assert pair.target.proc is not None and pair.target.proc.poll() is None


def test_modes_switch_live_and_nothing_written_is_lost(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    pair.initiator.sh(f"{CONNECT_ALL} -a {wait_address(pair.target, '169.254.')}")
    try:
        rc, written = write(pair, block(pair))
        assert rc == 0 and region_on_disk(pair) == written
        before = pair.sum_now(SERIAL)

        press(pair, "m", "o", then=r"every disk is now read-only")
        assert modes(pair) == {"ro"}
        rc, _ = write(pair, block(pair))
        assert rc != 0  # refused: the initiator sees the write fail
        assert pair.sum_now(SERIAL) == before  # exactly what was written before the switch

        press(pair, "m", "s", then=r"every disk is now snapshot")
        assert modes(pair) == {"snapshot"}
        assert pair.target.sh(STORES) != ""  # the RAM store, a tmpfs of its own per disk
        device = block(pair)
        rc, in_ram = write(pair, device)
        assert rc == 0
        back = pair.initiator.sh(f"dd if=/dev/{device} bs={SIZE} skip={OFFSET // SIZE} count=1 iflag=direct "
                                 "status=none | sha256sum | cut -c1-64")  # fmt: skip
        assert back.strip() == in_ram  # the initiator reads its own writes back
        assert pair.sum_now(SERIAL) == before  # the disk itself is not written

        # Leaving snapshot mode drops what was written to RAM: asked for first, with read-write.
        asked = r"Discard what was written to the snapshot of[\s\S]*?make\s+every\s+disk\s+READ-WRITE\?"  # may wrap
        press(pair, "m", "w", then=asked)
        press(pair, "y", then=r"every disk is now read-write")
        assert modes(pair) == {"rw"}
        assert pair.target.sh(STORES) == ""  # the snapshot's RAM store is freed
        assert pair.target.sh("ls /run/storagetm/cow 2>/dev/null || true") == ""
        rc, written = write(pair, block(pair))
        assert rc == 0 and region_on_disk(pair) == written
        assert "flushed /dev/" in pair.target.sh("journalctl -b -u storagetm --no-pager -o cat")
    finally:
        disconnect_all(pair.initiator)


def test_one_disk_by_its_number(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    status = json.loads(pair.target.sh("storagetm status --json"))
    names = sorted(e["disk"]["name"] for e in status["exports"])
    press(pair, "2", "o", then=rf"{names[1]} is now read-only")
    by_name = {e["disk"]["name"]: e["mode"] for e in json.loads(pair.target.sh("storagetm status --json"))["exports"]}
    assert by_name == {names[0]: "rw", names[1]: "ro"}
    press(pair, "2", "w", "y", then=rf"{names[1]} is now read-write")


def test_no_login_on_another_vt(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    combo = [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "f2")]
    pair.target.qmp.cmd("send-key", keys=combo)
    try:
        # No VT but tty1 is allocated (logind's NAutoVTs=0), so the kernel does not even switch.
        assert pair.target.sh("sleep 3; cat /sys/class/tty/tty0/active") == "tty1"
        active = pair.target.sh("systemctl list-units --no-legend --plain 'autovt@*' 'getty@*'")
        assert active == ""
    finally:
        pair.target.qmp.cmd("send-key", keys=[{"type": "qcode", "data": key} for key in ("ctrl", "alt", "f1")])
    assert pair.target.sh("cat /sys/class/tty/tty0/active") == "tty1"


def test_authentication_on_shows_a_new_line_to_type_and_off_lets_anyone_in(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "169.254.")
    press(pair, "a", then=r"Authentication is on")
    shown = re.compile(rf"nvme connect-all -t tcp -a {re.escape(address)} --hostnqn=(\S+) --dhchap-secret=(\S+:)")
    line = until(lambda: shown.search(screen_rows_joined(pair.target)), 30, "no connect line with a secret")
    try:
        _, rc = pair.initiator.run(f"{CONNECT_ALL} -a {address}")
        assert rc != 0 or connected(pair.initiator) == []  # without the secret: refused
        pair.initiator.sh(f"{CONNECT_ALL} -a {address} --hostnqn={line.group(1)} --dhchap-secret={line.group(2)}")
        assert sorted(r.serial for r in connected(pair.initiator)) == sorted(DISKS)
    finally:
        disconnect_all(pair.initiator)
    press(pair, "a", then=r"Turn authentication OFF\?")
    press(pair, "y", then=r"Authentication is off")
    try:
        pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
        assert sorted(r.serial for r in connected(pair.initiator)) == sorted(DISKS)
    finally:
        disconnect_all(pair.initiator)
