from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from msgspec.structs import replace

from storagetm.backing.modes import Mode
from storagetm.console.screen import Screen, render
from storagetm.console.stats import ActivityMeter, Counters, activity, initiators, read_counters
from storagetm.disks.disk import Disk
from storagetm.disks.identity import identity_for
from storagetm.model import Export, HashProgress
from storagetm.state import RunState

ANSI = re.compile(r"\x1b\[[0-9;]*m")

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"


def state_with(n: int) -> RunState:
    exports = {}
    for i in range(n):
        d = Disk(name=f"sd{chr(97 + i)}", devnode=f"/dev/sd{chr(97 + i)}", devnum=i + 1, devtype="disk",
                 size=100 << 20, model="Disk", serial=f"S{i}")  # fmt: skip
        e = Export(d, identity_for(BASE, d))
        exports[e.nqn] = e
    return RunState(exports=exports)


def write_stat(sys_dev_block: Path, devnum: int, read_sectors: int, written_sectors: int) -> None:
    directory = sys_dev_block / f"{os.major(devnum)}:{os.minor(devnum)}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stat").write_text(f"  10 0 {read_sectors} 5 3 0 {written_sectors} 7 0 12 12 0 0 0 0 0 0\n")


def test_counters_and_activity(tmp_path: Path) -> None:
    write_stat(tmp_path, os.makedev(8, 0), 2048, 1024)
    now = read_counters(os.makedev(8, 0), str(tmp_path))
    assert now is not None and now.read_bytes == 2048 * 512 and now.written_bytes == 1024 * 512
    assert read_counters(os.makedev(8, 16), str(tmp_path)) is None
    first = Counters(0, 0, now.at - 2.0)
    act = activity(first, first, now, 4 << 20)
    assert act.read_fraction == pytest.approx(0.25) and act.read_rate == pytest.approx(2048 * 512 / 2.0)


def test_meter_counts_from_export_and_restarts_for_a_new_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts start at the export; a disk exported again (another device number, or
    counters that went back) starts from zero; a regular file has no counters."""
    devices = {"/dev/sda": os.makedev(8, 0)}
    monkeypatch.setattr("storagetm.console.stats.device_number", devices.get)
    meter = ActivityMeter(str(tmp_path))
    write_stat(tmp_path, os.makedev(8, 0), 1000, 0)
    exported = {"nqn-a": ("/dev/sda", 1 << 20), "nqn-file": ("/srv/disk.img", 1 << 20)}
    assert meter.sample(exported)["nqn-a"].read_bytes == 0
    write_stat(tmp_path, os.makedev(8, 0), 1000 + 1024, 8)
    second = meter.sample(exported)
    assert set(second) == {"nqn-a"}
    assert second["nqn-a"].read_bytes == 1024 * 512 and second["nqn-a"].read_fraction == pytest.approx(0.5)
    assert second["nqn-a"].written_bytes == 8 * 512
    devices["/dev/sda"] = os.makedev(8, 16)  # unplugged and plugged back
    write_stat(tmp_path, os.makedev(8, 16), 5000, 0)
    assert meter.sample(exported)["nqn-a"].read_bytes == 0
    write_stat(tmp_path, os.makedev(8, 16), 10, 0)  # counters went back: a new disk at the same number
    assert meter.sample(exported)["nqn-a"].read_bytes == 0
    assert meter.sample({}) == {} and meter.first == {} and meter.last == {}


def test_initiators_from_proc_net(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    # 169.254.1.1:4420 <- 169.254.9.9:53422 over IPv6 (v4-mapped), fe80::1:8009 <- fe80::2,
    # a listening socket, and a connection to another port.
    mapped = "0000000000000000FFFF0000" + "0101FEA9"
    (tmp_path / "tcp6").write_text(
        header
        + f"   0: {mapped}:1144 0000000000000000FFFF0000"
        + "0909FEA9:D0AE 01 0:0 0:0 0 0\n"
        + "   1: 000080FE000000000000000001000000:1F49 000080FE000000000000000002000000:9C40 01 0:0 0\n"
        + "   2: 00000000000000000000000000000000:1144 00000000000000000000000000000000:0000 0A 0:0 0\n"
    )
    (tmp_path / "tcp").write_text(header + "   0: 0100000A:0016 0200000A:15B3 01 0:0 0:0 0 0\n")
    assert initiators({4420, 8009}, tmp_path) == ["169.254.9.9", "fe80::2"]
    assert initiators({4420}, tmp_path / "missing") == []


def test_dashboard_fits_80x25_and_shows_progress() -> None:
    state = state_with(12)
    first = next(iter(state.exports))
    state.activity = {first: activity(Counters(0, 0, 0.0), Counters(0, 0, 0.0), Counters(50 << 20, 0, 1.0), 100 << 20)}
    state.initiators = ["169.254.9.9"]
    text = render(state, dashboard=True)
    lines = text.splitlines()
    prose = [line for line in lines if not line.startswith(("  nvme ", "    nqn."))]
    assert len(lines) <= 25 and max(len(line) for line in prose) <= 80, text
    assert "[############------------]  50% read" in text
    assert "Initiators connected: 169.254.9.9" in text and "more: storagetm status" in text


def test_plain_output_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    screen = Screen(terminal=False)
    state = state_with(1)
    screen.show(state)
    screen.show(state)  # unchanged: printed once
    out = capsys.readouterr().out
    assert out.count("Exported disks (1)") == 1 and "\033[" not in out and "% read" not in out


def test_long_commands_are_split_into_console_rows() -> None:
    from storagetm.console.screen import fit_rows

    command = "  nvme check-tls-key -i -n " + "h" * 70 + " -d " + "k" * 60 + " -c NQN"
    rows = fit_rows(["short", "", command])
    assert rows[:2] == ["short", ""] and all(len(row) <= 80 for row in rows)
    assert "".join(rows[2:]) == command


def test_long_lines_are_split_after_a_space_not_in_a_word() -> None:
    from storagetm.console.screen import fit_rows

    hint = "  (for fe80:: use the other machine's interface after % and -f if its name differs, as here)"
    rows = fit_rows([hint])
    assert rows == ["  (for fe80:: use the other machine's interface after % and -f if its name ",
                    "differs, as here)"]  # fmt: skip
    assert "".join(rows) == hint


def test_warnings_and_modes_are_coloured_on_a_terminal_only() -> None:
    from storagetm.console.screen import RESET, coloured, render, warning_rows

    state = state_with(2)
    second = sorted(state.exports)[1]
    state.exports[second] = replace(state.exports[second], mode=Mode.READ_ONLY)
    lines = render(state, dashboard=True).splitlines()
    rows = coloured(lines, warning_rows(state))
    warning = next(row for row in rows if "can READ AND WRITE" in row)
    assert warning.startswith("\033[1;31m") and warning.endswith(RESET)
    assert any(row.endswith(f"[\033[1;31mread-write{RESET}]") for row in rows)
    assert any(row.endswith(f"[\033[1;32mread-only{RESET}]") for row in rows)
    assert "\033[" not in render(state, dashboard=True)  # `storagetm status` and logs: plain text
    assert [ANSI.sub("", row) for row in rows] == lines


def test_a_full_snapshot_is_red_and_a_working_one_yellow() -> None:
    from storagetm.console.screen import RESET, coloured

    full = "  sda  100.0 MiB  Disk  S0  [snapshot FULL: I/O now fails]"
    working = "  sdb  100.0 MiB  Disk  S1  [snapshot 5% of 16.0 MiB used]"
    assert coloured([full, working], set()) == [
        f"  sda  100.0 MiB  Disk  S0  [\033[1;31msnapshot FULL: I/O now fails{RESET}]",
        f"  sdb  100.0 MiB  Disk  S1  [\033[1;33msnapshot 5% of 16.0 MiB used{RESET}]",
    ]


def test_every_disk_is_shown_before_any_nqn_row() -> None:
    """Three disks with the keys line: the NQN rows go (status has them), not the third disk."""
    from storagetm.system.network import Address

    state = state_with(3)
    state.addresses = [Address("ipv4", "169.254.1.1", "enp0s3", True), Address("ipv6", "fe80::1", "enp0s3", True)]
    state.announced = "storagetm-0123456789ab.local"
    text = render(state, dashboard=True, keys=True, rows=20)  # as tight as the VM suite's target is at 25
    assert all(f"  {i} sd{c} " in text for i, c in ((1, "a"), (2, "b"), (3, "c"))), text
    assert "more: storagetm status" not in text and "    nqn." not in text
    assert len(text.splitlines()) <= 19  # the keys line below
    assert "    nqn." in render(state_with(1), dashboard=True, keys=True)  # room: the NQN rows stay


def test_the_disks_come_before_the_connection_code() -> None:
    from storagetm import connection
    from storagetm.model import Listener
    from storagetm.system.network import Address

    state = state_with(3)
    state.addresses = [Address("ipv4", "169.254.1.1", "enp0s3", True), Address("ipv6", "fe80::1", "enp0s3", True)]
    state.ports = [Listener("ipv6", "::", 4420)]
    code_rows = connection.screen_lines(state)
    assert code_rows
    roomy = render(state, dashboard=True, keys=True)
    assert code_rows[1] in roomy  # room for both
    # 17: the 14 rows with the code, a row kept for each disk's activity, the keys line: one too many.
    tight = render(state, dashboard=True, keys=True, rows=17)
    assert all(f" sd{c} " in tight for c in "abc") and code_rows[1] not in tight, tight


# ---- the sha256 computed on the target (asked for on the web page) ----------------------

DIGEST = "3f5a0c9e" * 8


def hashing(state: RunState, name: str, progress: HashProgress) -> RunState:
    nqn = next(nqn for nqn, export in state.exports.items() if export.disk.name == name)
    state.hashing[nqn] = progress
    return state


def rows_after(lines: list[str], disk: str) -> list[str]:
    """The rows under the disk's own row, up to the next disk's."""
    start = next(i for i, line in enumerate(lines) if re.match(rf"  (\d )?{disk} ", line))
    rest = lines[start + 1 :]
    return rest[: next((i for i, line in enumerate(rest) if not line.startswith("    ")), len(rest))]


def fits(text: str, rows: int = 25) -> None:
    lines = text.splitlines()
    prose = [line for line in lines if not line.startswith(("  nvme ", "    nqn."))]
    assert len(lines) <= rows and max(len(line) for line in prose) <= 80, text


def test_a_sha256_being_computed_shows_under_its_disk_with_its_progress() -> None:
    state = hashing(state_with(1), "sda", HashProgress(41 << 20, 100 << 20))
    text = render(state, dashboard=True, keys=True, rows=24)
    fits(text, 23)
    assert "    sha256 computing [##########--------------]  41%  41.0 MiB of 100.0 MiB" in rows_after(
        text.splitlines(), "1 sda"), text  # fmt: skip
    # `storagetm status` and plain output: its percentage only (a screen printed at each change)
    assert "    sha256 being computed: 41%" in rows_after(render(state).splitlines(), "sda")


def test_a_finished_sha256_shows_its_whole_digest_under_its_disk() -> None:
    state = hashing(state_with(1), "sda", HashProgress(100 << 20, 100 << 20, DIGEST))
    for text in (render(state, dashboard=True, keys=True, rows=24), render(state)):
        assert f"    sha256 {DIGEST}" in rows_after(text.splitlines(), "1 sda" if "1 sda" in text else "sda"), text
    fits(render(state, dashboard=True, keys=True, rows=24), 23)
    failed = hashing(state_with(1), "sda", HashProgress(5 << 20, 100 << 20, error="read error at byte "
                                                        "5242880: Input/output error" + " (and more)" * 9))  # fmt: skip
    row = next(row for row in render(failed, dashboard=True).splitlines() if "sha256" in row)
    assert row.startswith("    sha256 failed: read error at byte 5242880: Input/output error") and len(row) <= 80


def test_sha256_rows_of_several_disks_fit_80x25_with_the_keys_line() -> None:
    from storagetm.system.network import Address

    state = state_with(3)
    state.addresses = [Address("ipv4", "169.254.1.1", "enp0s3", True), Address("ipv6", "fe80::1", "enp0s3", True)]
    state.announced = "storagetm-0123456789ab.local"
    state.activity = {nqn: activity(Counters(0, 0, 0.0), Counters(0, 0, 0.0), Counters(10 << 20, 0, 1.0), 100 << 20)
                      for nqn in state.exports}  # fmt: skip
    hashing(state, "sda", HashProgress(100 << 20, 100 << 20, DIGEST))
    hashing(state, "sdc", HashProgress(26 << 20, 100 << 20))
    text = render(state, dashboard=True, keys=True, rows=24)  # the keys line is the 25th
    fits(text, 23)
    lines = text.splitlines()
    assert f"    sha256 {DIGEST}" in rows_after(lines, "1 sda")
    assert not any("sha256" in row for row in rows_after(lines, "2 sdb"))
    assert any(row.startswith("    sha256 computing [") and " 26% " in row for row in rows_after(lines, "3 sdc"))
    assert "more: storagetm status" not in text


def test_a_disk_being_hashed_is_shown_before_others_when_not_all_fit() -> None:
    """Twelve disks: the dashboard shows what it has room for and "… and N more"; the one
    whose sha256 the operator is to compare is among those shown."""
    state = hashing(state_with(12), "sdk", HashProgress(100 << 20, 100 << 20, DIGEST))
    text = render(state, dashboard=True, keys=True, rows=24)
    fits(text, 23)
    lines = text.splitlines()
    assert f"    sha256 {DIGEST}" in rows_after(lines, "sdk")
    assert "  1 sda " in text and "more: storagetm status" in text
    shown = sum(1 for line in lines if re.match(r"  (\d )?sd[a-l] ", line))
    assert f"  … and {12 - shown} more: storagetm status" in lines


def test_a_sha256_progress_redraws_only_its_own_row(tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.touch()
    screen = Screen([str(console)], terminal=True)
    state = hashing(state_with(2), "sda", HashProgress(10 << 20, 100 << 20))
    screen.show(state)
    first = console.read_bytes()
    screen.show(hashing(state, "sda", HashProgress(20 << 20, 100 << 20)))
    second = console.read_bytes()[len(first) :].decode()
    row = next(i for i, line in enumerate(screen.last.splitlines(), 1) if "sha256" in line)
    assert re.findall(r"\033\[(\d+);1H[^\033]", second) == [str(row)], second  # one row rewritten, then the cursor
    assert "20.0 MiB of 100.0 MiB" in second
    screen.close()


def test_the_daemon_puts_the_sha256_asked_for_on_the_web_page_on_the_screen(tmp_path: Path) -> None:
    """End to end: a sha256 asked for over HTTP, the daemon's next sample, and the screen
    shows the digest the HTTP reply gave under its disk."""
    import hashlib
    import http.client
    import time

    from storagetm.config.settings import Settings
    from storagetm.disks.udev import DiskEvent
    from tests.unit.fake_configfs import FakeConfigfs
    from tests.unit.test_daemon import QueuedEvents, attached, hot_disk

    disk = hot_disk(tmp_path)
    console = tmp_path / "console"
    console.touch()
    screen = Screen([str(console)], terminal=True)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,), web_port=0), FakeConfigfs(tmp_path / "configfs"),
                      screen)  # fmt: skip
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    daemon.start_web(host="127.0.0.1")
    assert daemon.web is not None

    def sha256() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.state.web.port, timeout=10)
        try:
            conn.request("GET", "/disks/hot.img.sha256")
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    try:
        daemon.sample_activity()
        daemon.publish()
        assert "sha256" not in screen.last  # nothing asked for yet
        deadline = time.monotonic() + 10
        while (reply := sha256())[0] == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = reply
        digest = body.split()[0]
        assert status == 200 and digest == hashlib.sha256(Path(disk.devnode).read_bytes()).hexdigest()
        daemon.sample_activity()
        daemon.publish()
        assert f"    sha256 {digest}" in rows_after(screen.last.splitlines(), "hot.img")
    finally:
        daemon.stop_web()
        screen.close()


def test_a_full_screen_first_draw_ends_on_its_last_row_without_scrolling(tmp_path: Path) -> None:
    """25 rows and a line break after the last scroll the console by one: every later
    in-place redraw would then land one row off."""
    console = tmp_path / "console"
    console.touch()
    screen = Screen([str(console)], terminal=True)
    screen.show(state_with(30))
    drawn, rows = console.read_bytes().decode(), len(screen.last.splitlines())
    assert drawn.count("\r\n") == rows - 1 and not drawn.endswith("\r\n"), drawn[-80:]
    screen.close()
