"""The whole system lives in RAM. The README states the smallest RAM it boots in; with less,
the console says so in one clear message instead of hanging or half working."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from storagetm.system.memory import MINIMUM_RAM_MIB
from testbed.machine import VM, Disk, make_disk
from testbed.pair import BOOT_TIMEOUT, LOGS, TARGET_APPEND, image, report

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def boot_with(memory: int, request: pytest.FixtureRequest) -> Iterator[VM]:
    workdir = LOGS / f"test_memory-{memory}"
    workdir.mkdir(parents=True, exist_ok=True)
    disk = Disk(workdir / "MEMO0001.img", "virtio", "MEMO0001")
    make_disk(disk.path, 8 << 20, b"MEMO0001")
    with VM("target", workdir, kernel=image("storagetm.efi"), append=TARGET_APPEND, disks=[disk], memory=memory) as vm:
        yield vm
        failed = request.session.testsfailed
    if failed:
        report(vm, lines=40)


@pytest.fixture
def at_minimum(request: pytest.FixtureRequest) -> Iterator[VM]:
    yield from boot_with(MINIMUM_RAM_MIB, request)


@pytest.fixture
def below_minimum(request: pytest.FixtureRequest) -> Iterator[VM]:
    yield from boot_with(MINIMUM_RAM_MIB - 64, request)


def test_boots_and_exports_at_the_stated_minimum(at_minimum: VM) -> None:
    at_minimum.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    assert "Initramfs unpacking failed" not in at_minimum.console()


def test_too_little_ram_is_said_plainly(below_minimum: VM) -> None:
    """Either the kernel could not unpack systemd (the image's /etc/init speaks), or it
    unpacked only part of the system (storagetm refuses): one clear line, nothing exported."""
    match = below_minimum.wait_for(
        r"storagetm: cannot start: only \d+ MiB of RAM is usable.*\n.*at least (\d+) MiB"
        r"|storagetm: the system did not fit in RAM.*at least (\d+) MiB", BOOT_TIMEOUT)  # fmt: skip
    assert str(MINIMUM_RAM_MIB) in match.groups(), match.group(0)
    assert not re.search(r"exported /dev/", below_minimum.console())
