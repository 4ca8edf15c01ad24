"""The target's own keyboard: keys decoded, what each does (confirmation for the dangerous
ones), the QR code, and the daemon carrying the commands out through the reconciler."""

from __future__ import annotations

import os
import subprocess
import termios
from pathlib import Path

import pytest

from storagetm.backing.modes import Mode
from storagetm.config.settings import Settings
from storagetm.console import qr
from storagetm.console.keys import KeyInput, decode
from storagetm.console.panel import HELP, KEYS_LINE, DiskChoice, Finish, Panel, SetAuth, SetMode, Stage
from storagetm.console.screen import Screen
from storagetm.disks.udev import DiskEvent
from storagetm.state import RunState
from storagetm.system import power
from storagetm.system.power import End
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import QueuedEvents, attached, hot_disk

DISKS = [DiskChoice("nqn.a", "sda", Mode.READ_ONLY), DiskChoice("nqn.b", "sdb", Mode.READ_ONLY)]


# ---- keys ---------------------------------------------------------------------


def test_bytes_decode_into_key_names() -> None:
    assert decode(b"mQ?1") == ["m", "q", "?", "1"]
    assert decode(b"\r\n\x7f\x03") == ["enter", "enter", "backspace", "ctrl-c"]
    assert decode(b"\x1b") == ["escape"]
    assert decode(b"\x1b[A\x1bOB\x1b[C") == ["up", "down", "right"]
    assert decode(b"\x1b[15~y") == ["y"]  # F5 is no key of the panel's, and does not eat the next
    assert decode(b"\x1b[1;5") == []  # cut short: dropped whole, nothing of it taken as keys
    assert decode(b"\x1bm") == []  # Alt+m is not m
    assert decode(b"\x00\x1a\xc3\xa9") == []  # other controls, and bytes of non-ASCII characters


def test_a_console_is_read_one_key_at_a_time_without_echo_and_restored_after(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        before = termios.tcgetattr(slave)
        keys = KeyInput([name, name, str(tmp_path / "no-such-console")])
        assert len(keys.fds()) == 1
        (fd,) = keys.fds()
        now = termios.tcgetattr(fd)
        assert not now[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert now[1] == before[1]  # output processing (newline translation) untouched
        os.write(master, b"m\x03")  # no Enter: one key at a time; Ctrl+C is a key, no signal
        assert keys.read(fd) == ["m", "ctrl-c"]
        assert keys.read(fd) == []  # nothing waiting: no block
        keys.close()
        assert termios.tcgetattr(slave)[3] == before[3]
        assert keys.fds() == []
    finally:
        os.close(master)
        os.close(slave)


def test_a_file_that_is_no_terminal_gives_no_keys(tmp_path: Path) -> None:
    plain = tmp_path / "console"
    plain.write_text("")
    assert KeyInput([str(plain)]).fds() == []


# ---- the panel ----------------------------------------------------------------


def press(panel: Panel, keys: str, auth_on: bool = False) -> list[object]:
    commands: list[object] = []
    for key in keys:
        commands += panel.handle(key, DISKS, auth_on)
    return commands


def test_m_then_a_mode_letter_sets_every_disk_read_only_or_snapshot_at_once() -> None:
    panel = Panel()
    assert press(panel, "m") == []
    assert panel.lines() == ["Mode for every disk: o read-only  s snapshot (RAM copy)  w read-write  Esc back"]
    assert press(panel, "o") == [SetMode(Mode.READ_ONLY)]
    assert press(panel, "ms") == [SetMode(Mode.SNAPSHOT)]
    assert panel.lines() == [KEYS_LINE]


def test_read_write_asks_first_and_only_y_confirms() -> None:
    panel = Panel()
    assert press(panel, "mw") == []
    assert panel.stage is Stage.CONFIRM
    assert panel.lines()[0].startswith("Make every disk READ-WRITE?")
    assert press(panel, "n") == []
    assert panel.lines() == [KEYS_LINE, "Cancelled."]
    assert press(panel, "mwy") == [SetMode(Mode.READ_WRITE)]


def test_a_digit_picks_that_disk_and_a_missing_one_is_named() -> None:
    panel = Panel()
    assert press(panel, "2o") == [SetMode(Mode.READ_ONLY, "nqn.b")]
    assert press(panel, "1w") == []
    assert "Make sda READ-WRITE?" in panel.lines()[0]
    assert press(panel, "y") == [SetMode(Mode.READ_WRITE, "nqn.a")]
    assert press(panel, "7") == []
    assert panel.lines() == [KEYS_LINE, "There is no disk 7: the disks are numbered 1-2."]
    assert press(panel, "1") == [] and press(panel, "x") == []  # a key that is no mode: back
    assert panel.stage is Stage.KEYS


def test_authentication_on_at_once_off_only_after_confirming() -> None:
    panel = Panel()
    assert press(panel, "a", auth_on=False) == [SetAuth(True)]
    assert press(panel, "a", auth_on=True) == []
    assert "Turn authentication OFF?" in panel.lines()[0]
    assert press(panel, "y", auth_on=True) == [SetAuth(False)]


def test_power_off_and_reboot_ask_first() -> None:
    panel = Panel()
    assert press(panel, "p") == [] and "Power off?" in panel.lines()[0]
    assert press(panel, "y") == [Finish(End.POWEROFF)]
    assert press(panel, "ry") == [Finish(End.REBOOT)]
    assert press(panel, "pq") == [] and panel.stage is Stage.KEYS  # q answered no; it opens nothing


def test_help_and_qr_code_show_until_any_key() -> None:
    panel = Panel()
    press(panel, "h")
    assert panel.overlay == HELP
    assert press(panel, "p") == [] and panel.overlay is None and panel.stage is Stage.KEYS
    press(panel, "?")
    assert panel.overlay == HELP
    press(panel, "x")
    press(panel, "q")
    assert panel.stage is Stage.QR
    press(panel, "y")
    assert panel.stage is Stage.KEYS


def test_every_panel_line_fits_the_serial_console() -> None:
    panel = Panel()
    long_name = [DiskChoice("nqn.c", "nvme10n1", Mode.READ_ONLY)]
    seen = [*HELP, KEYS_LINE]
    for keys in ("m", "1", "mw", "a", "p", "r"):
        panel = Panel()
        for key in keys:
            panel.handle(key, long_name, True)
        seen += panel.lines()
    assert max(len(line) for line in seen if not line.endswith("cancel.")) <= 80


# ---- the QR code ----------------------------------------------------------------


def test_the_qr_code_text_goes_to_qrencode_on_stdin_never_in_argv() -> None:
    calls: list[tuple[list[str], bytes]] = []

    def run(argv: list[str], data: bytes) -> str:
        calls.append((argv, data))
        return "\u2588\u2580\n\u2584\u2588\n"

    assert qr.render("nvme connect --dhchap-secret=DHHC-1:00:abc:", run) == ["\u2588\u2580", "\u2584\u2588"]
    ((argv, data),) = calls
    assert data == b"nvme connect --dhchap-secret=DHHC-1:00:abc:"
    assert not any("DHHC" in arg for arg in argv) and argv[:3] == ["qrencode", "-t", "UTF8"]


def test_no_qrencode_is_one_line_saying_which_package() -> None:
    def missing(argv: list[str], data: bytes) -> str:
        raise FileNotFoundError(2, "No such file or directory", "qrencode")

    def fails(argv: list[str], data: bytes) -> str:
        raise subprocess.CalledProcessError(1, argv)

    assert qr.render("x", missing) == ["No QR code: qrencode is not installed (Debian package qrencode)."]
    assert qr.render("x", fails)[0].startswith("No QR code: qrencode failed")


# ---- the screen -------------------------------------------------------------------


def test_the_keys_line_is_at_the_bottom_of_the_dashboard_and_disks_are_numbered(tmp_path: Path) -> None:
    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), FakeConfigfs(tmp_path / "configfs"))
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    screen = Screen(["/dev/null"], terminal=True)
    screen.set_panel([KEYS_LINE, "x " * 50])
    screen.show(daemon.state)
    lines = screen.last.splitlines()
    assert lines[-3] == KEYS_LINE and lines[-2:] == ["x " * 39 + "x", "x " * 9 + "x"]  # wrapped at word ends
    assert any(line.startswith("  1 hot.img") for line in lines)
    assert "Ctrl+C" not in screen.last
    screen.set_panel([], HELP)
    screen.show(daemon.state)
    assert screen.last.splitlines() == HELP
    screen.close()


# ---- the daemon carries the commands out ------------------------------------------


def test_a_mode_key_re_exports_through_the_reconciler_then_flushes_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = hot_disk(tmp_path)
    fake = FakeConfigfs(tmp_path / "configfs")
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), fake)
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    (nqn,) = daemon.state.exports
    device_path = fake.root / "subsystems" / nqn / "namespaces" / "1" / "device_path"
    flushed: list[tuple[str, str]] = []
    monkeypatch.setattr(power, "flush", lambda path: flushed.append((path, device_path.read_text().strip())))

    for key in "mo":
        daemon.on_key(key)
    assert daemon.state.exports[nqn].mode is Mode.READ_ONLY
    assert device_path.read_text().strip().startswith("/dev/mapper/storagetm-")
    assert flushed == [(disk.devnode, device_path.read_text().strip())]  # after the new backing took over
    assert daemon.panel.note == "every disk is now read-only."

    for key in "1wy":
        daemon.on_key(key)
    assert daemon.state.exports[nqn].mode is Mode.READ_WRITE
    assert device_path.read_text().strip() == disk.devnode
    assert daemon.settings.disk_modes[0] == (disk.devnode, Mode.READ_WRITE)  # kept if the disk comes back


def test_the_auth_key_makes_a_new_secret_and_the_power_key_stops_the_daemon(tmp_path: Path) -> None:
    daemon = attached(tmp_path, Settings(), FakeConfigfs(tmp_path / "configfs"))
    daemon.on_key("a")
    first = daemon.state.auth
    assert first.enabled and first.secret.startswith("DHHC-1:00:")
    assert daemon.panel.note.startswith("Authentication is on")
    daemon.on_key("a")
    daemon.on_key("y")
    assert not daemon.state.auth.enabled
    daemon.on_key("a")
    assert daemon.state.auth.secret != first.secret  # a new one each time
    assert not daemon.stop_requested
    daemon.on_key("p")
    daemon.on_key("y")
    assert daemon.stop_requested and daemon.end is End.POWEROFF


def test_the_qr_code_holds_the_connection_text_and_is_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []

    def render(text: str) -> list[str]:
        made.append(text)
        return ["QR"]

    monkeypatch.setattr(qr, "render", render)

    def text(run: RunState, port: int) -> str:
        return f"code for port {port}"

    daemon = attached(tmp_path, Settings(), FakeConfigfs(tmp_path / "configfs"), connection_text=text)
    daemon.on_key("q")
    assert daemon._overlay() == ["QR", "The connection details, for a phone's camera. Any key: back."]
    daemon._overlay()
    assert made == ["code for port 4420"]


def test_the_default_qr_text_is_the_connection_code() -> None:
    from storagetm import connection
    from storagetm.model import Listener
    from storagetm.system.network import Address

    addresses = [Address("ipv4", "169.254.7.7", "enp0s3", True), Address("ipv6", "fe80::1", "enp0s3", True)]
    run = RunState(addresses=addresses, ports=[Listener("ipv6", "::", 4420)])
    code = connection.decode(qr.connection_text(run, 4420))  # what `storagetm connect CODE` takes
    assert code.addresses == ("169.254.7.7", "fe80::1") and code.port == 4420
    assert qr.connection_text(RunState(), 4420) == ""  # no address yet: nothing to connect to


def test_authentication_turned_on_from_the_keyboard_locks_the_web_page_too(tmp_path: Path) -> None:
    """The page's downloads read the whole disk: once the NVMe side asks for a secret, the
    page asks for the token derived from it, and an earlier token no longer passes."""
    import http.client

    from storagetm.web.token import web_token

    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,), web_port=0), FakeConfigfs(tmp_path / "configfs"))
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    daemon.start_web(host="127.0.0.1")
    assert daemon.web is not None and daemon.state.web.token == ""
    port = daemon.state.web.port

    def status(path: str, cookie: str = "") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
            reply = conn.getresponse()
            reply.read()
            return reply.status
        finally:
            conn.close()

    try:
        assert status("/disks/hot.img.img") == 200  # open while the disks are
        daemon.on_key("a")
        token = daemon.state.web.token
        assert token and token == web_token(daemon.state.auth, daemon.state.tls)
        assert daemon.state.web.port == port
        assert status("/disks/hot.img.img") == 403
        assert status("/disks/hot.img.img", f"storagetm_token={token}") == 200
        daemon.on_key("a")
        daemon.on_key("y")
        daemon.on_key("a")  # on again: a new secret, so a new token
        assert daemon.state.web.token not in ("", token)
        assert status("/disks/hot.img.img", f"storagetm_token={token}") == 403
    finally:
        daemon.stop_web()


def test_a_disk_kept_read_only_by_a_bad_mode_option_is_not_said_to_be_changed(tmp_path: Path) -> None:
    """A bad default mode makes every disk read-only whatever else says (fail closed): one
    disk's key cannot lift that, and the screen must not claim it did."""
    disk = hot_disk(tmp_path)
    settings = Settings(devices=(disk.devnode,), mode=Mode.READ_ONLY, mode_unsure=True)
    daemon = attached(tmp_path, settings, FakeConfigfs(tmp_path / "configfs"))
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    (nqn,) = daemon.state.exports
    for key in "1wy":
        daemon.on_key(key)
    assert daemon.state.exports[nqn].mode is Mode.READ_ONLY
    assert "read-write" not in daemon.panel.note and "read-only" in daemon.panel.note


def test_leaving_snapshot_mode_asks_first_its_writes_are_dropped() -> None:
    """The RAM copy goes with snapshot mode: what the other machine wrote there is lost."""
    disks = [DiskChoice("nqn.a", "sda", Mode.SNAPSHOT), DiskChoice("nqn.b", "sdb", Mode.READ_ONLY)]
    panel = Panel()
    for key in "mo":
        assert panel.handle(key, disks, False) == []
    assert panel.stage is Stage.CONFIRM and "snapshot of sda?" in panel.lines()[0]
    assert panel.handle("n", disks, False) == []
    assert [c for key in "1oy" for c in panel.handle(key, disks, False)] == [SetMode(Mode.READ_ONLY, "nqn.a")]
    assert [c for key in "2o" for c in panel.handle(key, disks, False)] == [SetMode(Mode.READ_ONLY, "nqn.b")]
    assert [c for key in "ms" for c in panel.handle(key, disks, False)] == [SetMode(Mode.SNAPSHOT)]
    for key in "1w":
        panel.handle(key, disks, False)
    assert panel.lines()[0].startswith("Discard what was written to the snapshot of sda and make sda READ-WRITE?")
