"""Export modes and the block device each one puts in front of a disk.

- read-write: the disk itself.
- read-only:  a device-mapper `flakey` device over the disk with `error_writes`, always in
  its "down" interval: reads pass through, every write (and discard) fails with EIO on
  the initiator. nvmet has no read-only switch and opens its backend read-write, and a
  read-only block device does not stop bio writes (it only warns), so writes must be
  refused by a layer that errors them.
- snapshot:   a device-mapper `snapshot` of the disk with a non-persistent copy-on-write
  store in RAM: a sparse file of the set size on tmpfs behind a loop device (512-byte
  sectors; zram would force 4 KiB logical blocks on the snapshot, and the initiator would
  see a different disk geometry). The initiator reads back its own writes, the disk itself
  is only ever read. When the store is full, device-mapper invalidates the snapshot:
  further I/O fails with EIO, the disk stays untouched.
"""

from __future__ import annotations

import contextlib
import enum
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from storagetm.errors import StorageTMError

SECTOR = 512
DM_PREFIX = "storagetm-"
COW_DIR = Path("/run/storagetm/cow")  # tmpfs: RAM
# 16 KiB: reads split at 4 KiB chunks ran at 0.92× a read-only export's speed, at 16 KiB at
# par, and a scattered 4 KiB write still takes only 16 KiB of the store (docs/design.md).
SNAPSHOT_CHUNK_SECTORS = 32


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


@dataclass(frozen=True)
class Backing:
    """The device nvmet exports for one disk, and what was made for it."""

    path: str
    dm_name: str = ""
    cow: str = ""  # loop device of the copy-on-write store (snapshot mode)
    loop: str = ""  # loop device put under a regular file for device-mapper


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackingError(f"{' '.join(argv[:3])} failed: {result.stderr.strip() or result.returncode}",
                           hint="is the dm-flakey/dm-snapshot/loop module available?")  # fmt: skip
    return result.stdout


def dm_name_for(nqn: str, mode: Mode) -> str:
    return f"{DM_PREFIX}{mode.value}-{nqn.rsplit('.', 1)[-1][:80]}"


def prepare(source: str, size: int, mode: Mode, nqn: str, snapshot_size: int) -> Backing:
    """Create the device to export for `source` in `mode` (nothing for read-write)."""
    if mode is Mode.READ_WRITE:
        return Backing(source)
    loop = ""
    if Path(source).is_file():
        loop = _run("losetup", "--find", "--show", source).strip()
    try:
        backing = _prepare_dm(loop or source, size, mode, nqn, snapshot_size)
    except BackingError:
        if loop:
            _run("losetup", "--detach", loop)
        raise
    return Backing(backing.path, backing.dm_name, backing.cow, loop)


def _prepare_dm(source: str, size: int, mode: Mode, nqn: str, snapshot_size: int) -> Backing:
    sectors = size // SECTOR
    name = dm_name_for(nqn, mode)
    if Path(f"/dev/mapper/{name}").exists():
        _remove_dm(name)
    _run("modprobe", "dm_flakey" if mode is Mode.READ_ONLY else "dm_snapshot")
    if mode is Mode.READ_ONLY:
        _run("dmsetup", "create", name, "--table", f"0 {sectors} flakey {source} 0 0 1 1 error_writes")
        return Backing(f"/dev/mapper/{name}", dm_name=name)
    cow = _cow_create(name, snapshot_size)
    try:
        _run("dmsetup", "create", name, "--table", f"0 {sectors} snapshot {source} {cow} N {SNAPSHOT_CHUNK_SECTORS}")
    except BackingError:
        _cow_remove(cow)
        raise
    return Backing(f"/dev/mapper/{name}", dm_name=name, cow=cow)


def release(backing: Backing) -> None:
    if backing.dm_name:
        _remove_dm(backing.dm_name)
    if backing.cow:
        _cow_remove(backing.cow)
    if backing.loop:
        subprocess.run(["losetup", "--detach", backing.loop], capture_output=True, check=False)


def _remove_dm(name: str) -> None:
    # udev may still hold the new device open for a moment (probing); retry briefly.
    for attempt in range(20):
        result = subprocess.run(["dmsetup", "remove", name], capture_output=True, text=True, check=False)
        if result.returncode == 0 or "No such device" in result.stderr:
            return
        time.sleep(0.1 * (attempt + 1))
    raise BackingError(f"cannot remove {name}: {result.stderr.strip()}")


def _cow_create(name: str, size: int) -> str:
    """A RAM-backed block device of `size` bytes for a snapshot's exceptions."""
    COW_DIR.mkdir(parents=True, exist_ok=True)
    path = COW_DIR / f"{name}.cow"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: tmpfs pages are only used as the initiator writes
    try:
        return _run("losetup", "--find", "--show", str(path)).strip()
    finally:
        path.unlink()  # the loop device keeps it; gone from RAM when the loop device is detached
        with contextlib.suppress(OSError):
            COW_DIR.rmdir()  # nothing stays behind in /run


def _cow_remove(loop: str) -> None:
    subprocess.run(["losetup", "--detach", loop], capture_output=True, check=False)


@dataclass(frozen=True)
class SnapshotUsage:
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
    result = subprocess.run(["dmsetup", "status", dm_name], capture_output=True, text=True, check=False)
    return parse_snapshot_status(result.stdout.strip()) if result.returncode == 0 else None
