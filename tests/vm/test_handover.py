"""`storagetm FILE` typed on a running target hands the file to the running daemon (the
control socket, /run/storagetm/control) instead of starting an engine of its own: the
daemon exports it beside its disks, the initiator reads the file's bytes, and the export
ends with the command, whether it is stopped (SIGTERM: the farewell line, exit 0) or killed
(SIGKILL: the daemon sees the connection close and withdraws the file)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, wait_address
from testbed.pair import BOOT_TIMEOUT, Pair, exported_subsystems
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"HAND0001": "virtio"}
FILE = "/var/tmp/handover.img"
COPY = "/tmp/handover.img"  # the same bytes on the initiator, to compare with
LOG = "/tmp/handover.log"
PID = "/tmp/handover.pid"  # the command's own pid (exec'd by the sh that wrote it)
RC = "/tmp/handover.rc"  # its exit status, once it has ended
# As typed at the target's shell, in the background; the exit status kept without job control.
# In a subshell of its own: no job of the harness's interactive shell (whose "Done" line would
# land in the next command's output), and no trailing `&`, on which the harness hangs.
START = (f"rm -f {LOG} {RC} {PID}; ( (sh -c 'echo $$ >{PID}; exec storagetm {FILE} >{LOG} 2>&1'; echo $? >{RC}) "
         f"</dev/null >/dev/null 2>&1 & )")  # fmt: skip
MAKE_FILE = ("python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(23).randbytes(8 << 20))' "
             "> {path}")  # fmt: skip


def status(pair: Pair) -> dict[str, Any]:
    return dict(json.loads(pair.target.sh("storagetm status --json")))


def handed_nqn(pair: Pair) -> str | None:
    return next((e["nqn"] for e in status(pair)["exports"] if e["disk"]["devnode"] == FILE), None)


def hand_over(pair: Pair) -> str:
    """`storagetm FILE` in the background, as typed at the target's shell; the file's NQN."""
    pair.target.sh(START)
    return until(lambda: handed_nqn(pair), 60, lambda: f"{FILE} not exported: {pair.target.sh(f'cat {LOG}')}")


def ended(pair: Pair) -> str:
    """The command's exit status, once it has ended."""
    return until(lambda: pair.target.sh(f"cat {RC} 2>/dev/null || true").strip(), 120, "the command did not end")


def test_a_file_exported_by_hand_goes_through_the_daemon_and_ends_with_the_command(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "fe80::")
    daemon = status(pair)["pid"]
    (disk_nqn,) = exported_subsystems(pair.target)
    pair.target.sh(MAKE_FILE.format(path=FILE), timeout=120)
    pair.initiator.sh(MAKE_FILE.format(path=COPY), timeout=120)
    try:
        nqn = hand_over(pair)
        assert sorted(exported_subsystems(pair.target)) == sorted([disk_nqn, nqn])
        assert status(pair)["pid"] == daemon  # the running daemon exports it: no second engine took over
        client = pair.target.sh(f"cat {PID}").strip()
        # The command waits as a client: it loaded no engine, whose disk watch maps libudev.
        # grep exits 0 on a match, 1 on none and 2 if the process (its maps) is gone.
        libudev = {pid: pair.target.run(f"grep -q libudev /proc/{pid}/maps")[1] for pid in (client, daemon)}
        assert libudev == {client: 1, daemon: 0}, libudev
        journal = pair.target.sh("journalctl -b -u storagetm --no-pager -o cat")
        assert f"exported {FILE} (read-write) as {nqn}" in journal
        assert f"storagetm: exported {FILE} (read-write) as {nqn}" in pair.target.sh(f"cat {LOG}")
        pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
        remote = next(r for r in connected(pair.initiator) if r.nqn == nqn)
        assert pair.initiator.sh(f"cmp /dev/{remote.block} {COPY} && echo same", timeout=300).strip() == "same"
        disconnect_all(pair.initiator)

        pair.target.sh(f"kill -KILL {client}")
        assert ended(pair) == "137"
        until(lambda: nqn not in exported_subsystems(pair.target), 60, f"{nqn} still exported after SIGKILL")
        after = status(pair)
        assert after["pid"] == daemon and [e["nqn"] for e in after["exports"]] == [disk_nqn]
        assert f"withdrew {nqn} ({FILE})" in pair.target.sh("journalctl -b -u storagetm --no-pager -o cat")

        nqn = hand_over(pair)  # again, and stopped as Ctrl+C or `kill` would stop it
        pair.target.sh(f"kill -TERM $(cat {PID})")
        assert ended(pair) == "0"
        assert pair.target.sh(f"cat {LOG}").rstrip().endswith("Stopping: exports withdrawn, disks flushed.")
        assert exported_subsystems(pair.target) == [disk_nqn]
    finally:
        disconnect_all(pair.initiator)
        pair.target.run(f"kill -KILL $(cat {PID}) 2>/dev/null; rm -f {FILE} {LOG} {PID} {RC}")


def test_without_a_daemon_the_command_exports_the_file_itself(pair: Pair) -> None:
    """storagetm stopped (no socket): the command is an engine of its own, as before."""
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    pair.target.sh("systemctl stop storagetm", timeout=120)
    pair.target.sh(MAKE_FILE.format(path=FILE), timeout=120)
    try:
        assert pair.target.run("test -e /run/storagetm/control")[1] != 0
        pair.target.sh(START)
        client = until(lambda: pair.target.sh(f"cat {PID} 2>/dev/null || true").strip(), 30, "it did not start")

        def own_engine() -> str | None:
            out, rc = pair.target.run("storagetm status --json")
            return str(out) if rc == 0 and json.loads(out)["pid"] == int(client) else None

        until(own_engine, 120, lambda: f"the command did not start its own engine: {pair.target.sh(f'cat {LOG}')}")
        assert len(exported_subsystems(pair.target)) == 1
        pair.target.sh(f"kill -TERM {client}")
        assert ended(pair) == "0"
        assert exported_subsystems(pair.target) == []
    finally:
        pair.target.run(f"kill -KILL $(cat {PID}) 2>/dev/null; rm -f {FILE} {LOG} {PID} {RC}")
