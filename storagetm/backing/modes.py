"""Export modes and the block device each one puts in front of a disk.

- read-write: the disk itself.
- read-only:  a device-mapper `flakey` device over the disk with `error_writes`, always in
  its "down" interval: reads pass through, every write (and discard) fails with EIO on
  the initiator. nvmet has no read-only switch and opens its backend read-write, and a
  read-only block device does not stop bio writes (it only warns), so writes must be
  refused by a layer that errors them.
- snapshot:   a device-mapper `snapshot` of the disk with a non-persistent copy-on-write
  store in RAM: a sparse file of the set size behind a loop device (512-byte sectors; zram
  would force 4 KiB logical blocks on the snapshot, and the initiator would see a different
  disk geometry), on a tmpfs of its own of the same size (COW_DIR/<dm name>), so no store
  can fill /run. A store is made only if the RAM available, less what the other stores may
  still take, holds it. The initiator reads back its own writes, the disk itself is only
  ever read. When the store is full, device-mapper invalidates the snapshot: further I/O
  fails with EIO, the disk stays untouched.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from msgspec import Struct

from storagetm.errors import StorageTMError
from storagetm.system.log import Logger

SECTOR = 512
DM_PREFIX = "storagetm-"
COW_DIR = Path("/run/storagetm/cow")  # each store: a tmpfs of its own below it
RAM_RESERVE = 64 << 20  # bytes of available RAM no store may take: for the system and nvmet
# A store of no size asked for (0): this much, or what RAM can hold if that is less, but not
# below the minimum (a laptop with 1 GiB of RAM still gets snapshot mode).
DEFAULT_STORE_SIZE = 1 << 30
MIN_STORE_SIZE = 16 << 20
PACKAGES = {"dmsetup": "dmsetup", "losetup": "mount", "mount": "mount", "umount": "mount", "modprobe": "kmod"}
# 16 KiB: reads split at 4 KiB chunks ran at 0.92× a read-only export's speed, at 16 KiB at
# par, and a scattered 4 KiB write still takes only 16 KiB of the store (docs/measurements.md).
SNAPSHOT_CHUNK_SECTORS = 32

log = Logger(__name__)


class Mode(enum.Enum):
    READ_WRITE = "rw"
    READ_ONLY = "ro"
    SNAPSHOT = "snapshot"

    @classmethod
    def parse(cls, text: str) -> Mode:
        aliases = {"rw": cls.READ_WRITE, "read-write": cls.READ_WRITE, "ro": cls.READ_ONLY,
                   "read-only": cls.READ_ONLY, "snapshot": cls.SNAPSHOT, "cow": cls.SNAPSHOT}  # fmt: skip
        try:
            return aliases[text.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown mode {text!r} (use rw, ro or snapshot)") from None

    @property
    def label(self) -> str:
        return {"rw": "read-write", "ro": "read-only", "snapshot": "snapshot"}[self.value]


class BackingError(StorageTMError):
    pass


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M or 2G)")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(match.group(1)) * factor


Run = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def read_mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Bytes of RAM the kernel can hand out without swapping (MemAvailable)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def statvfs_free(store: Path) -> int:
    """Bytes a mounted store may still take: RAM promised to it and not yet used."""
    if not os.path.ismount(store):
        return 0
    st = os.statvfs(store)
    return st.f_bavail * st.f_frsize


class System(Struct, frozen=True):
    """What the modes ask of the machine; unit tests pass fakes."""

    run: Run = run_command
    mem_available: Callable[[], int] = read_mem_available
    store_free: Callable[[Path], int] = statvfs_free
    cow_dir: Path = COW_DIR
    mounted: Callable[[Path], bool] = os.path.ismount
    sys_block: Path = Path("/sys/block")


def run(system: System, mode: Mode, *argv: str) -> str:
    try:
        result = system.run(argv)
    except FileNotFoundError:
        package = PACKAGES.get(argv[0], argv[0])
        raise BackingError(f"{mode.label} mode needs {argv[0]} (package {package}), which is not installed",
                           hint=f"install it, e.g. apt install {package}") from None  # fmt: skip
    except OSError as exc:
        raise BackingError(f"{mode.label} mode: cannot run {argv[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        raise BackingError(f"{mode.label} mode: {' '.join(argv[:3])} failed: "
                           f"{result.stderr.strip() or result.returncode}",
                           hint="is the dm-flakey/dm-snapshot/loop module available?")  # fmt: skip
    return result.stdout


def undo(system: System, *argv: str) -> None:
    """One rollback or teardown step: a failure is logged and the next step goes on."""
    try:
        result = system.run(argv)
    except OSError as exc:
        log.warning("%s: %s, ignoring", " ".join(argv[:2]), exc.strerror)
        return
    if result.returncode != 0:
        log.warning("%s failed: %s, ignoring", " ".join(argv), result.stderr.strip() or result.returncode)


def dm_name_for(nqn: str, mode: Mode) -> str:
    return f"{DM_PREFIX}{mode.value}-{nqn.rsplit('.', 1)[-1][:80]}"


def remove_dm(system: System, name: str) -> None:
    # udev may still hold the new device open for a moment (probing); retry briefly.
    for attempt in range(20):
        try:
            result = system.run(("dmsetup", "remove", name))
        except OSError as exc:
            raise BackingError(f"cannot remove {name}: cannot run dmsetup: {exc.strerror}") from None
        if result.returncode == 0 or "No such device" in result.stderr:
            return
        time.sleep(0.1 * (attempt + 1))
    raise BackingError(f"cannot remove {name}: {result.stderr.strip()}")


def store_size(system: System, asked: int) -> int:
    """The size of a new store: `asked`, or with 0 (none asked for) the default, cut down to
    what RAM can hold. Refused when RAM cannot hold what was asked, or the minimum."""
    if asked:
        check_room(system, asked)
        return asked
    size = min(DEFAULT_STORE_SIZE, room(system)) // SECTOR * SECTOR
    if size < MIN_STORE_SIZE:
        check_room(system, MIN_STORE_SIZE)
    return max(size, MIN_STORE_SIZE)


def room(system: System) -> int:
    """RAM a new store may take: what is available, less what the other stores may still
    take (their mounts' free space) and a reserve for the system itself."""
    stores = [p for p in system.cow_dir.iterdir() if p.is_dir()] if system.cow_dir.is_dir() else []
    promised = sum(system.store_free(store) for store in stores)
    return max(0, system.mem_available() - promised - RAM_RESERVE)


def check_room(system: System, size: int) -> None:
    """Refuse a store that RAM cannot hold."""
    free = room(system)
    if size > free:
        raise BackingError(f"snapshot store needs {size >> 20} MiB of RAM, only {free >> 20} MiB free",
                           hint="give storagetm.snapshot_size= (--snapshot-size) a smaller size, "
                                "or export it read-only")  # fmt: skip


def store_create(system: System, name: str, size: int) -> Path:
    """A RAM-backed file of `size` bytes for a snapshot's exceptions, sparse, on a tmpfs of
    its own `size` big, so a full store never fills /run (and the state files). Made whole
    or not at all."""
    store = system.cow_dir / name
    if store.is_dir():  # left by a storagetm that crashed before it recorded the store
        store_remove(system, store)
    try:
        store.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise BackingError(f"cannot make the snapshot store {store}: {exc.strerror}") from None
    with contextlib.ExitStack() as rollback:
        rollback.callback(_store_rmdir, store)
        run(system, Mode.SNAPSHOT, "mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,nosuid,nodev,noexec",
            "storagetm-cow", str(store))  # fmt: skip
        rollback.callback(undo, system, "umount", "--lazy", str(store))
        try:
            with open(store / "store.cow", "wb") as f:
                f.truncate(size)  # sparse: tmpfs pages are only used as the initiator writes
        except OSError as exc:
            raise BackingError(f"cannot make the snapshot store {store}: {exc.strerror}") from None
        rollback.pop_all()
    return store


def store_remove(system: System, store: Path) -> None:
    # Lazy: if udev still holds the loop device, the file (and its RAM) goes when it lets go.
    if system.mounted(store):  # a store refused (RAM) or cut short before its mount has none
        undo(system, "umount", "--lazy", str(store))
    _store_rmdir(store)


def _store_rmdir(store: Path) -> None:
    with contextlib.suppress(OSError):
        (store / "store.cow").unlink(missing_ok=True)  # on the store itself if it never got its tmpfs
    for directory in (store, store.parent):  # nothing stays behind in /run
        with contextlib.suppress(OSError):
            directory.rmdir()


class SnapshotUsage(Struct, frozen=True):
    used: int  # bytes of copy-on-write store in use
    total: int
    invalid: bool  # the store filled up: the snapshot no longer accepts I/O

    @property
    def percent(self) -> float:
        return 100.0 if self.invalid else (100.0 * self.used / self.total if self.total else 0.0)


def parse_snapshot_status(line: str) -> SnapshotUsage | None:
    """`dmsetup status` of a snapshot: `0 N snapshot USED/TOTAL META` or `… Invalid`."""
    fields = line.split()
    if len(fields) < 4 or fields[2] != "snapshot":
        return None
    if fields[3] in ("Invalid", "Overflow"):
        return SnapshotUsage(0, 0, True)
    used, _, total = fields[3].partition("/")
    return SnapshotUsage(int(used) * SECTOR, int(total) * SECTOR, False)


def snapshot_usage(dm_name: str) -> SnapshotUsage | None:
    try:
        result = subprocess.run(["dmsetup", "status", dm_name], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return parse_snapshot_status(result.stdout.strip()) if result.returncode == 0 else None
