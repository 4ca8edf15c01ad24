"""Secure Boot as the firmware reports it, and as the screen shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from storagetm.console.screen import render
from storagetm.state import RunState
from storagetm.system.firmware import secure_boot


@pytest.mark.parametrize(("value", "expected"), [(b"\x06\0\0\0\x01", True), (b"\x06\0\0\0\x00", False),
                                                 (b"\x06\0\0", False)])  # fmt: skip
def test_secure_boot_from_efivars(tmp_path: Path, value: bytes, expected: bool) -> None:
    # The name efivarfs gives it: the UEFI spec's global variable GUID.
    (tmp_path / "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c").write_bytes(value)
    assert secure_boot(tmp_path) is expected


def test_secure_boot_unknown_without_the_variable(tmp_path: Path) -> None:
    assert secure_boot(tmp_path) is None


@pytest.mark.parametrize(("on", "shown"), [(True, "(Secure Boot on)"), (False, "(Secure Boot off)"), (None, "")])
def test_screen_title_says_whether_secure_boot_is_on(on: bool | None, shown: str) -> None:
    title = render(RunState(secure_boot=on)).splitlines()[0]
    assert title.endswith("NVMe/TCP" + (" " + shown if shown else ""))
    assert len(title) <= 80


def test_state_keeps_secure_boot_across_json() -> None:
    assert RunState.from_json(RunState(secure_boot=True).to_json()).secure_boot is True
    assert RunState.from_json(RunState().to_json()).secure_boot is None
