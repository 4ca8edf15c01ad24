"""Fixtures for the VM suite, built on the `testbed` package: a target + initiator pair booted
once per module and shared by its tests (each boot costs ~40 s under TCG), handed to each test
in a known state, so that no test depends on what the tests before it did."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.pair import LOGS, TARGET_APPEND, Pair, report, vm_pair

DISKS = {"VIRT0001": "virtio", "NVME0001": "nvme", "SATA0001": "sata", "USB00001": "usb"}


@pytest.fixture(scope="module")
def booted_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
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


@pytest.fixture
def pair(booted_pair: Pair) -> Pair:
    """The module's pair, its target up and storagetm running whatever the tests before did."""
    booted_pair.ensure_serving()
    return booted_pair
