"""Fixtures for the VM suite: the built image, and a target + initiator pair booted once
per module and shared by its tests (each boot costs ~40 s under TCG)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.machine import VM, Disk, make_disk, sha256_file

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "mkosi.output"
LOGS = Path(os.environ.get("STORAGETM_VM_LOGS", REPO / "tests" / "vm" / "logs"))
DISK_SIZE = 32 << 20
COMMON = "console=tty0 console=ttyS0,115200 audit=0 loglevel=4 systemd.show_status=error systemd.debug_shell=ttyS1"
TARGET_APPEND = COMMON  # no unit given: the image's default target is target mode
INITIATOR_APPEND = f"{COMMON} systemd.unit=multi-user.target"
BOOT_TIMEOUT = 240


def image(name: str) -> Path:
    path = OUTPUT / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build it first with ci/build-image.sh")
    return path


@dataclass
class Pair:
    target: VM
    initiator: VM
    disks: dict[str, Disk]  # serial -> disk
    sums: dict[str, str]  # serial -> sha256 of the disk file at creation


def make_disks(workdir: Path, kinds: dict[str, str], size: int = DISK_SIZE) -> tuple[dict[str, Disk], dict[str, str]]:
    disks, sums = {}, {}
    for serial, kind in kinds.items():
        path = workdir / f"{serial}.img"
        sums[serial] = make_disk(path, size, serial.encode())
        disks[serial] = Disk(path, kind, serial)
    return disks, sums


def initiator_vm(workdir: Path, link: Path, efi: Path | None = None) -> VM:
    """The initiator: the same image booted to multi-user.target, serving the link socket.
    Its machine identity is fixed so that its host NQN is the same in every run."""
    return VM("initiator", workdir, kernel=efi or image("storagetm.efi"), append=INITIATOR_APPEND, link_socket=link,
              link_server=True, mac="52:54:00:00:00:02", uuid="0c8e3a55-5f6b-4d8e-8d2a-6e1f4b7a2c10")  # fmt: skip


def boot_pair(
    workdir: Path,
    kinds: dict[str, str],
    target_append: str = TARGET_APPEND,
    prepare: Callable[[dict[str, Disk]], None] | None = None,
    disk_size: int = DISK_SIZE,
    stick: Path | None = None,
) -> Pair:
    """Create the disks (then let `prepare` rewrite them), start the target, then the initiator.
    With `stick`, the target boots from that USB stick under Secure Boot, through its boot
    menu (`target_append` is then unused), instead of the UKI given to QEMU directly."""
    workdir.mkdir(parents=True, exist_ok=True)
    disks, sums = make_disks(workdir, kinds, disk_size)
    if prepare is not None:
        prepare(disks)
        sums = {serial: sha256_file(disk.path) for serial, disk in disks.items()}
    link = workdir / "link.sock"
    link.unlink(missing_ok=True)
    efi = image("storagetm.efi")
    # The initiator listens on the link socket: QEMU's stream client does not reconnect, but
    # a server accepts a new client, so the target can be power-cycled and join again.
    target = VM("target", workdir, kernel=efi, append=target_append, disks=list(disks.values()),
                link_socket=link, link_server=False, mac="52:54:00:00:00:01")  # fmt: skip
    if stick is not None:
        target.kernel, target.secure_boot = None, True
        target.extra = ["-drive", f"if=none,id=boot,format=raw,file={stick}",
                        "-device", "usb-storage,bus=xhci.0,drive=boot,bootindex=0,serial=BOOTSTICK"]  # fmt: skip
    initiator = initiator_vm(workdir, link)
    initiator.start()
    try:
        target.start()
    except BaseException:
        initiator.stop()
        raise
    return Pair(target, initiator, disks, sums)


def prepare_initiator(initiator: VM, timeout: float = 120) -> None:
    """nvme-tcp loaded, and the initiator's own link-local addresses usable (DAD and IPv4LL
    probing done): connecting from a tentative address fails with EADDRNOTAVAIL."""
    initiator.sh("modprobe nvme_tcp")
    deadline = time.monotonic() + timeout
    while True:
        addrs, _ = initiator.run("ip -o addr show dev enp0s3")  # not there until udev renamed it
        if "169.254." in addrs and "fe80::" in addrs and "tentative" not in addrs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the initiator's link-local addresses are not ready: {addrs}")
        time.sleep(1)


def report(pair: Pair, request: pytest.FixtureRequest) -> None:
    for vm in (pair.target, pair.initiator):
        print(f"\n===== {vm.name}: last console lines ({vm.console_log}) =====\n{vm.tail(30)}")
        print(f"\n===== {vm.name}: last kernel messages ({vm.kernel_log}) =====\n{vm.kernel_tail(30)}")


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    workdir = LOGS / request.module.__name__.rsplit(".", 1)[-1]
    kinds = getattr(request.module, "DISKS", {"VIRT0001": "virtio", "NVME0001": "nvme", "SATA0001": "sata",
                                              "USB00001": "usb"})  # fmt: skip
    append = getattr(request.module, "TARGET_APPEND", TARGET_APPEND)
    p = boot_pair(workdir, kinds, append)
    try:
        p.target.wait_shell(BOOT_TIMEOUT)
        p.initiator.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(p.initiator)
        yield p
    finally:
        failed = request.session.testsfailed
        p.initiator.stop()
        p.target.stop()
        if failed:
            report(p, request)
