"""Strings from hardware and the network reach terminals without control characters:
a disk whose model holds ESC[2J does not clear the screen of whoever lists the disks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from storagetm import cli, state
from storagetm.console.screen import render
from storagetm.disks import identity, policy, udev
from storagetm.disks.disk import Disk, disk_from_udev
from storagetm.disks.identity import identity_for, valid_nqn
from storagetm.disks.policy import SystemFacts
from storagetm.model import Export
from storagetm.state import RunState
from storagetm.system import log
from storagetm.system.network import parse_ip_json
from storagetm.text import human_size, printable
from tests.unit.test_disks import FakeDevice

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
CLEAR = "\x1b[2J"


def hostile_disk(tmp_path: Path) -> Disk:
    sysfs = tmp_path / "vdb"
    (sysfs / "device").mkdir(parents=True)
    (sysfs / "size").write_text("32768\n")
    (sysfs / "device" / "model").write_text(f"Evil{CLEAR}Disk\x9b2J\x07\n")
    node = tmp_path / "vdb.img"
    node.write_bytes(bytes(8192))
    device = FakeDevice(sysfs, node)
    device.properties = {**device.properties, "ID_SERIAL_SHORT": f"S{CLEAR}1", "ID_FS_LABEL": "L\x1b]0;x\x07"}
    return disk_from_udev(device)


def no_controls(text: str) -> bool:
    return not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in text)


def test_sizes_are_in_binary_units_from_one_function() -> None:
    import storagetm.initiator.progress

    assert [human_size(n) for n in (0, 1023, 1536, 5 << 30, 3 << 50)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB", "3072.0 TiB"]  # fmt: skip
    assert not hasattr(storagetm.initiator.progress, "human")


def test_printable_keeps_spaces_and_text() -> None:
    assert printable(f"Samsung SSD 870{CLEAR}\x00\x7f\x9b ü") == "Samsung SSD 870?[2J??? ü"


def test_disk_strings_are_made_harmless_where_they_are_read(tmp_path: Path) -> None:
    disk = hostile_disk(tmp_path)
    assert (disk.model, disk.serial, disk.fs_label) == ("Evil?[2JDisk?2J?", "S?[2J1", "L?]0;x?")


def test_list_devices_shows_the_model_harmlessly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = hostile_disk(tmp_path)

    class Devices:
        def enumerate(self) -> list[Disk]:
            return [disk]

    monkeypatch.setattr(udev, "BlockDevices", Devices)  # cli imports it when it runs
    monkeypatch.setattr(policy, "system_facts", SystemFacts)
    monkeypatch.setattr(identity, "host_identity", lambda: "machine-id:test")
    assert cli.main(["--list-devices"]) == 0
    out = capsys.readouterr().out
    assert "Evil?[2JDisk" in out and no_controls(out)


def test_screen_and_status_show_the_model_harmlessly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = hostile_disk(tmp_path)
    export = Export(disk, identity_for(BASE, disk))
    current = RunState(pid=os.getpid(), exports={export.nqn: export},
                       addresses=parse_ip_json('[{"ifname":"e\\u001b[2J","addr_info":[{"family":"inet6",'
                                               '"local":"fe80::1"}]}]'))  # fmt: skip
    for text in (render(current), render(current, dashboard=True)):
        assert "vdb" in text and "fe80::1%e?[2J" in text and no_controls(text)
    monkeypatch.setattr(state, "STATE_FILE", tmp_path / "run" / "state.json")
    state.save(current)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "fe80::1%e?[2J" in out and no_controls(out)


def test_host_nqns_with_control_characters_are_refused() -> None:
    assert valid_nqn("nqn.2014-08.org.nvmexpress:uuid:1234")
    assert not valid_nqn(f"nqn.2014-08.org.nvmexpress:{CLEAR}")


def test_log_lines_are_made_printable() -> None:
    out = io.StringIO()
    with log.capture() as records:
        log.Logger("storagetm").warning("not exporting %s: %s", f"/dev/x{CLEAR}", "fake\nstoragetm: forged line")
    assert [r.message for r in records] == ["not exporting /dev/x?[2J: fake?storagetm: forged line"]
    log.Destination(log.INFO, out).emit(records[0])
    assert out.getvalue() == "storagetm: not exporting /dev/x?[2J: fake?storagetm: forged line\n"
    journal = io.StringIO()
    log.Destination(log.INFO, journal, journal=True).emit(records[0])
    assert journal.getvalue() == "<4>not exporting /dev/x?[2J: fake?storagetm: forged line\n"  # journald's priority


def test_a_logged_exception_keeps_its_traceback_lines() -> None:
    with log.capture() as records:
        try:
            raise OSError(5, f"I/O error{CLEAR}")
        except OSError:
            log.Logger("storagetm").warning("cannot flush %s", "/dev/sda", exc_info=True)
    lines = records[0].message.split("\n")
    assert lines[0] == "cannot flush /dev/sda" and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "OSError: [Errno 5] I/O error?[2J"
