"""Did the running system fit in RAM? The image runs from its initramfs. When the kernel
runs out of memory while unpacking it, it logs one line and boots what it unpacked; the
files missing from the end of the archive would fail later in ways nobody can read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from storagetm.errors import ExitCode, StorageTMError

MINIMUM_RAM_MIB = 576  # measured under QEMU: 512 MiB unpacks partly (with iSCSI), 576 MiB fully (README)
UNPACK_FAILED = "Initramfs unpacking failed"
RAM_ROOT_TYPES = {"rootfs", "tmpfs", "ramfs"}


class InsufficientMemoryError(StorageTMError):
    exit_code = ExitCode.INSUFFICIENT_MEMORY


def root_is_in_ram(mounts: Path = Path("/proc/self/mounts")) -> bool:
    root_type = ""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "/":
            root_type = fields[2]  # the last mount on / is the one in use
    return root_type in RAM_ROOT_TYPES


def kernel_log_mentions(text: str, kmsg: Path = Path("/dev/kmsg")) -> bool:
    """Whether a record still in the kernel's log buffer contains `text`."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                return False  # EAGAIN: no more records
            if not record:
                return False
            if text.encode() in record:
                return True
    finally:
        os.close(fd)


def usable_ram_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def check_system_complete() -> None:
    """Refuse to run on a system the kernel could only partly unpack into RAM."""
    if root_is_in_ram() and kernel_log_mentions(UNPACK_FAILED):
        raise InsufficientMemoryError(
            f"the system did not fit in RAM: the kernel ran out of memory unpacking it "
            f"({usable_ram_mib()} MiB usable), so parts of it are missing; nothing was exported",
            hint=f"boot storagetm on a machine with at least {MINIMUM_RAM_MIB} MiB of RAM",
        )
