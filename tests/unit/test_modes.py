from __future__ import annotations

import pytest

from storagetm.backing.modes import Mode, parse_size, parse_snapshot_status
from storagetm.config.options import apply_kernel_cmdline
from storagetm.config.settings import OptionError, Settings, parse_modes, parse_snapshot_size
from storagetm.console.screen import render
from storagetm.disks.disk import Disk
from storagetm.disks.identity import identity_for
from storagetm.model import Export
from storagetm.state import RunState

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"


def disk(name: str, serial: str) -> Disk:
    return Disk(name=name, devnode=f"/dev/{name}", devnum=1, devtype="disk", size=1 << 30, serial=serial)


def test_modes_default_and_per_disk() -> None:
    settings = parse_modes("ro,sdb=rw,SER9=snapshot", Settings())
    assert settings.mode is Mode.READ_ONLY
    assert settings.mode_for(disk("sda", "X")) is Mode.READ_ONLY
    assert settings.mode_for(disk("sdb", "Y")) is Mode.READ_WRITE
    assert settings.mode_for(disk("sdc", "SER9")) is Mode.SNAPSHOT
    with pytest.raises(OptionError, match="unknown mode 'rx'"):
        parse_modes("rx", Settings())


def test_kernel_mode_options() -> None:
    settings, problems = apply_kernel_cmdline(
        Settings(all_disks=True), "storagetm.mode=snapshot storagetm.snapshot_size=64M"
    )
    assert problems == [] and settings.mode is Mode.SNAPSHOT and settings.snapshot_size == 64 << 20
    settings, problems = apply_kernel_cmdline(
        Settings(all_disks=True), "storagetm.mode=bogus storagetm.snapshot_size=1x"
    )
    assert settings.mode_for(disk("sda", "A")) is Mode.READ_ONLY and len(problems) == 2  # fails closed
    assert problems[0].startswith("storagetm.mode='bogus' is not valid: unknown mode 'bogus'")
    assert problems[0].endswith("— exporting every disk read-only; fix the boot option")
    assert problems[1].startswith("storagetm.snapshot_size='1x' is not valid")
    assert problems[1].endswith("— using the default; fix the boot option")


def test_sizes() -> None:
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_snapshot_status() -> None:
    usage = parse_snapshot_status("0 65536 snapshot 2048/16384 16")
    assert usage is not None and usage.used == 2048 * 512 and usage.total == 16384 * 512 and usage.percent == 12.5
    invalid = parse_snapshot_status("0 65536 snapshot Invalid")
    assert invalid is not None and invalid.invalid
    assert parse_snapshot_status("0 65536 linear") is None


def test_screen_tells_the_truth_per_mode() -> None:
    ro, snap = disk("sda", "A"), disk("sdb", "B")
    exports = {
        e.nqn: e
        for e in (
            Export(ro, identity_for(BASE, ro), Mode.READ_ONLY),
            Export(snap, identity_for(BASE, snap), Mode.SNAPSHOT),
        )
    }
    text = render(RunState(exports=exports)).replace("\n", " ")
    assert "can READ sda; writes are refused" in text
    assert "can READ sdb and write to a RAM copy; the disks themselves are not changed" in text
    assert "READ AND WRITE" not in text
    assert "[read-only]" in text and "[snapshot]" in text  # its size is known once the store is made


@pytest.mark.parametrize("value", ["99999999999T", "8388608T"])  # 8388608T is 2^63 bytes
def test_absurd_snapshot_size_refused_at_parse_time(value: str) -> None:
    with pytest.raises(OptionError, match=f"snapshot size '{value}' is above 8E"):
        parse_snapshot_size(value)
    settings, problems = apply_kernel_cmdline(Settings(), f"storagetm.snapshot_size={value}")
    assert settings.snapshot_size == Settings().snapshot_size and len(problems) == 1
    assert "is above 8E" in problems[0] and problems[0].endswith("— using the default; fix the boot option")
    assert parse_snapshot_size("8388607T") == (1 << 63) - (1 << 40)


def test_absurd_snapshot_size_is_a_usage_error_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from storagetm.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["--snapshot-size", "99999999999T", "--list-devices"])
    assert exited.value.code == 2
    assert "is above 8E" in capsys.readouterr().err
