"""The built image, and a target + initiator pair on one link: the initiator (the same image
booted to multi-user.target) serves a `-netdev stream` unix socket, the target joins it.
`vm_pair()` boots both and always stops them; `running_initiator()` is the initiator alone,
for targets that join it one after another (network boots, benchmarks)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed import VMError
from testbed.initiator import prepare_initiator
from testbed.machine import VM, Disk, boot_drive, make_disk, sha256_file

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "mkosi.output"
LOGS = Path(os.environ.get("STORAGETM_VM_LOGS", REPO / "tests" / "vm" / "logs"))
DISK_SIZE = 32 << 20
COMMON = "console=tty0 console=ttyS0,115200 audit=0 loglevel=4 systemd.show_status=error systemd.debug_shell=ttyS1"
TARGET_APPEND = COMMON  # no unit given: the image's default target is target mode
INITIATOR_APPEND = f"{COMMON} systemd.unit=multi-user.target"
BOOT_TIMEOUT = 240
TARGET_MAC = "52:54:00:00:00:01"


def link_local(mac: str) -> str:
    """The IPv6 link-local address the kernel gives a NIC with this MAC (EUI-64)."""
    import ipaddress

    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


TARGET_LINK_LOCAL = link_local(TARGET_MAC)  # on the target's NIC to the initiator (a target may have a second)


def image(name: str) -> Path:
    path = OUTPUT / name
    if not path.exists():
        raise VMError(f"{path} is missing: build it first with ci/build-image.sh")
    return path


@dataclass
class Pair:
    target: VM
    initiator: VM
    disks: dict[str, Disk]  # serial -> disk
    sums: dict[str, str]  # serial -> sha256 of the disk file at creation

    def sum_now(self, serial: str) -> str:
        """sha256 of the disk file as it is now, for a disk another test may have written to."""
        return sha256_file(self.disks[serial].path)

    def ensure_serving(self, timeout: float = BOOT_TIMEOUT) -> None:
        """The target powered on and storagetm running. What stopped either (a test that powers
        the target off, or stops storagetm) is undone: the target boots again (its console
        starts afresh) and storagetm is started. Costs one shell command when nothing was."""
        if self.target.proc is None:
            self.target.start()
            self.target.wait_shell(timeout)
        self.target.sh("systemctl start storagetm", timeout=timeout)  # Type=notify: returns once ready


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


def target_vm(
    workdir: Path,
    link: Path,
    *,
    kernel: Path | None,
    append: str = "",
    disks: Sequence[Disk] = (),
    extra: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    secure_boot: bool = False,
) -> VM:
    """A target joining the initiator's link socket. The initiator is the server: QEMU's stream
    client does not reconnect, but a server accepts a new client, so the target can be
    power-cycled (or a new target booted) and join again. Without `kernel` the firmware boots
    what `extra` gives it (a stick, a network-boot NIC)."""
    return VM("target", workdir, kernel=kernel, append=append, disks=list(disks), extra=list(extra),
              wrapper=list(wrapper), secure_boot=secure_boot, link_socket=link, link_server=False,
              mac=TARGET_MAC)  # fmt: skip


@contextlib.contextmanager
def running_initiator(workdir: Path, link: Path, efi: Path | None = None) -> Iterator[VM]:
    """The initiator alone, booted and prepared (`prepare_initiator`); always stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    vm = initiator_vm(workdir, link, efi)
    try:
        vm.start()
        vm.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(vm)
        yield vm
    finally:
        vm.stop()


@contextlib.contextmanager
def vm_pair(
    workdir: Path,
    kinds: dict[str, str],
    target_append: str = TARGET_APPEND,
    prepare: Callable[[dict[str, Disk]], None] | None = None,
    disk_size: int = DISK_SIZE,
    stick: Path | None = None,
    shell_timeout: float | None = BOOT_TIMEOUT,
    target_extra: Sequence[str] = (),
) -> Iterator[Pair]:
    """Create the disks (serial -> kind; then let `prepare` rewrite them), start the initiator,
    then the target with the disks, and stop both on the way out. With `shell_timeout`, wait
    that long for both debug shells and prepare the initiator before yielding; with None, yield
    at once (the caller has a boot menu to drive, or waits for the screen first). With `stick`,
    the target boots from that USB stick under Secure Boot, through its boot menu
    (`target_append` is then unused), instead of the UKI given to QEMU directly. `target_extra`:
    more QEMU arguments for the target (a second NIC, say)."""
    workdir.mkdir(parents=True, exist_ok=True)
    disks, sums = make_disks(workdir, kinds, disk_size)
    if prepare is not None:
        prepare(disks)
        sums = {serial: sha256_file(disk.path) for serial, disk in disks.items()}
    link = workdir / "link.sock"
    link.unlink(missing_ok=True)
    efi = image("storagetm.efi")
    if stick is None:
        target = target_vm(workdir, link, kernel=efi, append=target_append, disks=list(disks.values()),
                           extra=target_extra)  # fmt: skip
    else:
        target = target_vm(workdir, link, kernel=None, append=target_append, disks=list(disks.values()),
                           extra=[*boot_drive(stick), *target_extra], secure_boot=True)  # fmt: skip
    pair = Pair(target, initiator_vm(workdir, link), disks, sums)
    try:
        pair.initiator.start()
        pair.target.start()
        if shell_timeout is not None:
            pair.target.wait_shell(shell_timeout)
            pair.initiator.wait_shell(shell_timeout)
            prepare_initiator(pair.initiator)
        yield pair
    finally:
        pair.initiator.stop()
        pair.target.stop()


def report(*vms: VM, lines: int = 30) -> None:
    """Each VM's last console lines and kernel messages, for a failure report."""
    for vm in vms:
        print(f"\n===== {vm.name}: last console lines ({vm.console_log}) =====\n{vm.tail(lines)}")
        print(f"\n===== {vm.name}: last kernel messages ({vm.kernel_log}) =====\n{vm.kernel_tail(lines)}")


SUBSYSTEMS = "/sys/kernel/config/nvmet/subsystems"
ANCHOR_SUFFIX = ":discovery-port"  # the subsystem that makes port 8009 listen; no host may use it


def exported_subsystems(target: VM) -> list[str]:
    """The NQNs of the disks exported now, as configfs holds them (the anchor left out)."""
    return [nqn for nqn in target.sh(f"ls -A {SUBSYSTEMS}").split() if not nqn.endswith(ANCHOR_SUFFIX)]
