"""The clean end: exports withdrawn, every exported disk flushed, the screen told, then
power-off or reboot when asked for (tests/vm/test_clean_end.py proves it on a real kernel)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest

from storagetm import state
from storagetm.cli import main
from storagetm.config.settings import Settings
from storagetm.daemon import farewell_line
from storagetm.disks.udev import DiskEvent
from storagetm.errors import ExitCode
from storagetm.state import RunState
from storagetm.system import log, power
from storagetm.system.power import End
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import QueuedEvents, RecordingScreen, attached, hot_disk


class FarewellScreen(RecordingScreen):
    def __init__(self) -> None:
        super().__init__()
        self.last_words: list[str] = []

    def farewell(self, line: str) -> None:
        self.last_words.append(line)


def test_flush_all_flushes_each_disk_once_and_names_the_ones_it_could_not(
    tmp_path: Path, logged: list[log.Record]
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 4096)
    gone = str(tmp_path / "gone")
    flushed: list[str] = []

    def flusher(path: str) -> None:
        power.flush(path)  # the real fsync; a missing disk raises
        flushed.append(path)

    failed = power.flush_all([str(disk), gone, str(disk)], flusher)
    assert flushed == [str(disk)]
    assert failed == [f"{gone}: No such file or directory"]
    text = "\n".join(r.message for r in logged)
    assert f"flushed {disk}" in text and f"cannot flush {gone}" in text


def test_the_farewell_says_what_was_done_and_what_follows() -> None:
    assert farewell_line(True, [], End.POWEROFF) == "Stopping: exports withdrawn, disks flushed - powering off"
    assert farewell_line(True, [], End.REBOOT) == "Stopping: exports withdrawn, disks flushed - rebooting"
    assert farewell_line(False, [], End.STOP) == "Stopping: exports withdrawn."
    assert farewell_line(True, ["/dev/sda: Input/output error"], End.STOP) == (
        "Stopping: exports withdrawn, NOT FLUSHED: /dev/sda: Input/output error.")  # fmt: skip


@pytest.mark.parametrize(("jobs", "end"), [
    ("123 poweroff.target start waiting\n124 systemd-poweroff.service start waiting\n", End.POWEROFF),
    ("7 reboot.target start waiting\n", End.REBOOT),
    ("9 storagetm.service stop running\n", End.STOP),
    ("", End.STOP),
])  # fmt: skip
def test_a_stop_from_systemd_knows_whether_the_machine_goes_down(jobs: str, end: End) -> None:
    assert power.shutdown_under_way(lambda argv: jobs) is end


def test_power_off_and_reboot_are_queued_with_systemd_and_a_plain_stop_asks_nothing() -> None:
    asked: list[Sequence[str]] = []

    def systemctl(argv: Sequence[str]) -> str:
        asked.append(argv)
        return ""

    for end in End:
        assert power.request(end, systemctl)
    assert asked == [["systemctl", "--no-block", "poweroff"], ["systemctl", "--no-block", "reboot"]]

    def refused(argv: Sequence[str]) -> str:
        raise OSError(2, "No such file or directory")

    assert power.request(End.POWEROFF, refused) is False


def test_the_power_signals_ask_for_power_off_and_reboot_and_a_later_sigterm_keeps_it(tmp_path: Path) -> None:
    daemon = attached(tmp_path, Settings(), FakeConfigfs(tmp_path / "configfs"))
    daemon._on_signal(int(signal.SIGRTMIN) + 4, None)
    assert daemon.stop_requested and daemon.end is End.POWEROFF
    daemon._on_signal(signal.SIGTERM, None)  # systemd's own stop, as the power-off begins
    assert daemon.end is End.POWEROFF
    daemon._on_signal(int(signal.SIGRTMIN) + 5, None)
    assert daemon.end.value == "reboot"


def test_teardown_withdraws_the_exports_then_flushes_each_disk_then_tells_the_screen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = hot_disk(tmp_path)
    fake = FakeConfigfs(tmp_path / "configfs")
    screen = FarewellScreen()
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), fake, screen)
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    assert daemon.state.exports
    seen: list[tuple[str, list[str]]] = []

    def flush(path: str) -> None:
        seen.append((path, sorted(os.listdir(fake.root / "subsystems"))))

    monkeypatch.setattr(power, "flush", flush)
    monkeypatch.setattr(power, "shutdown_under_way", lambda: End.STOP)
    daemon.stop(End.POWEROFF)
    daemon.withdraw_and_flush()
    assert seen == [(disk.devnode, [])]  # flushed once nothing is exported any more
    assert screen.last_words == ["Stopping: exports withdrawn, disks flushed - powering off"]
    assert daemon.state.exports == {}


@pytest.mark.parametrize(("option", "signum"), [
    ([], signal.SIGTERM), (["--poweroff"], signal.SIGRTMIN + 4), (["--reboot"], signal.SIGRTMIN + 5),
])  # fmt: skip
def test_storagetm_stop_sends_the_signal_for_what_should_follow(
    option: list[str], signum: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state.save(RunState(pid=4242))
    sent: list[tuple[int, int]] = []
    alive = {4242}

    def kill(pid: int, sig: int) -> None:
        if sig == 0:
            if pid not in alive:
                raise ProcessLookupError(3, "No such process")
            return
        sent.append((pid, sig))
        alive.discard(pid)

    monkeypatch.setattr(os, "kill", kill)
    assert main(["stop", *option]) == ExitCode.OK
    assert sent == [(4242, signum)]
    out = capsys.readouterr().out
    assert out.startswith("storagetm stopped")
    assert ("powering off" in out) == (option == ["--poweroff"])


def test_storagetm_stop_takes_one_of_poweroff_and_reboot(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's own usage error, as every subcommand's
        main(["stop", "--poweroff", "--reboot"])
    assert exited.value.code == ExitCode.USAGE
    assert "not allowed with argument" in capsys.readouterr().err
