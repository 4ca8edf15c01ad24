"""Trying the image by hand, the mkosi way (README): `ci/mkosi.sh summary` shows the
configuration and `ci/mkosi.sh vm` boots the built UKI in target mode with the sample disks
of mkosi.conf's [Runtime] section, the screen in the terminal."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

import pytest

from testbed.machine import ANSI
from testbed.pair import BOOT_TIMEOUT, LOGS, REPO, image
from testbed.wait import until

pytestmark = pytest.mark.vm


def test_mkosi_summary_shows_the_image() -> None:
    out = subprocess.run(["ci/mkosi.sh", "summary"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"Output Format: uki", out.stdout)
    assert "serial=SAMPLE01" in out.stdout


def kill_vm(session: subprocess.Popen[bytes]) -> None:
    """mkosi runs QEMU in a sandbox of its own: end the whole session, then any QEMU of ours
    left behind (recognised by the sample drives mkosi made for it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        session.wait(timeout=20)
    subprocess.run(["pkill", "-KILL", "-f", "qemu-system.*mkosi-drive-sample"], check=False)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session.pid, signal.SIGKILL)
    session.wait(timeout=20)


def test_mkosi_vm_boots_target_mode_with_the_sample_disks() -> None:
    image("storagetm.efi")  # built, so mkosi's output directory holds it too
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / "mkosi-vm.log"
    log.unlink(missing_ok=True)
    # A terminal, as a person has: mkosi's interactive console wants one.
    session = subprocess.Popen(
        ["script", "-qfc", "ci/mkosi.sh vm", str(log)], cwd=REPO, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        screen = ""

        def exported_or_ended() -> bool:
            nonlocal screen
            screen = ANSI.sub("", log.read_bytes().decode(errors="replace")) if log.exists() else ""
            return bool(re.search(r"Exported disks \(3\)", screen)) or session.poll() is not None

        until(exported_or_ended, BOOT_TIMEOUT, lambda: screen[-2000:])
        assert re.search(r"Exported disks \(3\)", screen), screen[-2000:]
        for serial in ("SAMPLE01", "SAMPLE02", "SAMPLE03"):
            assert serial in screen
        assert "storagetm: target disk mode - disks exported over NVMe/TCP (Secure Boot off)" in screen
    finally:
        kill_vm(session)
