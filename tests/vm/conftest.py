"""Fixtures for the VM suite, built on the `testbed` package: a target + initiator pair booted
once per module and shared by its tests (each boot costs ~40 s under TCG)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.pair import LOGS, TARGET_APPEND, Pair, report, vm_pair

DISKS = {"VIRT0001": "virtio", "NVME0001": "nvme", "SATA0001": "sata", "USB00001": "usb"}


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The module's pair: its disks are the module's DISKS (serial -> kind), the target's
    command line its TARGET_APPEND, when it has them."""
    workdir = LOGS / request.module.__name__.rsplit(".", 1)[-1]
    kinds = getattr(request.module, "DISKS", DISKS)
    append = getattr(request.module, "TARGET_APPEND", TARGET_APPEND)
    with vm_pair(workdir, kinds, append) as p:
        yield p
        failed = request.session.testsfailed
    if failed:
        report(p.target, p.initiator)
