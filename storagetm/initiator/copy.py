"""Copy a disk to a file or a block device: sparse, resumable, verified by reading both anew.

Resuming: a sidecar file (DEST.storagetm-copy) records which disk is being copied (its NQN
and size) and how far DEST holds it, written only after DEST was synced up to there. A later
copy of the same disk to the same DEST starts from that offset.

Reading: O_DIRECT where the file system allows it (FileReader), a block ahead in a thread
(readahead.py), so that the target sends the next block while this one is written.

Verifying: once the copy is complete, the whole source is read again from the target with
O_DIRECT (not from this machine's page cache), and compared with DEST read back, itself
O_DIRECT or with its cache dropped. Not a hash of what was written: that would only prove
the copy wrote what it read.

The values are NamedTuples and Copier a plain class, not dataclasses: importing dataclasses
and making classes of it was a quarter of the one-file helper's start-up.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from storagetm.errors import StorageTMError, UsageError
from storagetm.initiator.progress import Progress
from storagetm.initiator.readahead import ReadAhead
from storagetm.statefile import replace_atomic

BLOCK = 4 << 20
SIDECAR_SUFFIX = ".storagetm-copy"
SYNC_EVERY_BYTES = 256 << 20
SYNC_EVERY_SECONDS = 5.0
# Test hooks (the VM suite): SIGKILL this process once the copy has recorded this offset;
# read at most this many bytes per second (to stop the target while a copy runs).
KILL_AT = "STORAGETM_TEST_COPY_KILL_AT"
RATE = "STORAGETM_TEST_COPY_RATE"
GONE = (errno.EIO, errno.ENXIO, errno.ENODEV, errno.ENOLINK, errno.ETIMEDOUT)
ZEROS = bytes(BLOCK)


class CopyError(StorageTMError):
    pass


class TargetGone(CopyError):
    def __init__(self, offset: int) -> None:
        super().__init__(f"target went away at offset {offset}; run the same command again to resume",
                         hint="if storagetm restarted there, connect again first: storagetm connect")  # fmt: skip
        self.offset = offset


class Source(NamedTuple):
    path: str
    identity: str  # the subsystem NQN
    size: int


class Reader(Protocol):
    def read_into(self, buffer: memoryview, offset: int) -> int: ...

    def close(self) -> None: ...


class FileReader:
    """O_DIRECT into page-aligned buffers where the file system allows it: the copy then goes
    from the target to DEST without passing through this machine's page cache (one memory copy
    and the cache's bookkeeping less per byte, and the disk does not push out what is cached),
    and the check reads the medium again, not what the copy left cached. Where O_DIRECT is
    refused (tmpfs and some others): plain reads, with the kernel's readahead for the copy,
    after dropping the file's cached pages for the check (`fresh`)."""

    def __init__(self, path: str, fresh: bool = False) -> None:
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED if fresh else os.POSIX_FADV_SEQUENTIAL)

    def read_into(self, buffer: memoryview, offset: int) -> int:
        try:
            return os.preadv(self.fd, [buffer], offset)
        except OSError as exc:
            if self.direct and exc.errno == errno.EINVAL:  # an unaligned tail: read it through the cache
                self.direct = False
                fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
                os.close(self.fd)
                self.fd = fd
                return os.preadv(self.fd, [buffer], offset)
            raise

    def close(self) -> None:
        os.close(self.fd)


Opener = Callable[[str, bool], Reader]  # (path, fresh): True for the check, which must not read a cache


def open_reader(path: str, fresh: bool) -> Reader:
    return FileReader(path, fresh)


def sidecar_of(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


class Record(NamedTuple):
    identity: str
    size: int
    done: int
    verified: str = ""  # "" not yet, else the verdict line

    def save(self, path: Path) -> None:
        replace_atomic(path, json.dumps({"source": self.identity, "size": self.size, "done": self.done,
                                         "verified": self.verified}).encode())  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Record | None:
        try:
            data = json.loads(path.read_text())
            return cls(str(data["source"]), int(data["size"]), int(data["done"]), str(data.get("verified", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise CopyError(f"{path} is damaged", hint=f"delete it and {path.name.removesuffix(SIDECAR_SUFFIX)} "
                            "to start the copy over") from None  # fmt: skip


def _mounted_devices(mountinfo: Path = Path("/proc/self/mountinfo")) -> set[str]:
    """major:minor of every mounted block device."""
    try:
        return {line.split()[2] for line in mountinfo.read_text().splitlines() if len(line.split()) > 2}
    except OSError:
        return set()


def _number(device: int) -> str:
    return f"{os.major(device)}:{os.minor(device)}"


def _with_partitions(rdev: int, sys_root: Path = Path("/sys")) -> set[str]:
    base = sys_root / "dev/block" / _number(rdev)
    found = {_number(rdev)}
    try:
        for child in base.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                found.add(dev.read_text().strip())
    except OSError:
        pass
    return found


def source_devices(path: str, sys_root: Path = Path("/sys")) -> set[str]:
    """major:minor of the disk being copied and of its partitions: a DEST that is one of
    them, or a file on a file system of theirs, would overwrite the source as it is read."""
    source_stat = os.stat(path)
    return _with_partitions(source_stat.st_rdev, sys_root) if stat.S_ISBLK(source_stat.st_mode) else set()


def check_destination(source: Source, dest: Path, mountinfo: Path = Path("/proc/self/mountinfo"),
                      sys_root: Path = Path("/sys")) -> bool:  # fmt: skip
    """Refuse a DEST that is the source (or on it), mounted, or too small; True if it is a block device."""
    on_source = source_devices(source.path, sys_root)
    try:
        dest_stat = dest.stat()
    except FileNotFoundError:
        if not dest.parent.is_dir():
            raise UsageError(f"{dest.parent} does not exist", hint="create the directory first") from None
        if _number(dest.parent.stat().st_dev) in on_source:
            raise UsageError(f"{dest.parent} is on the disk being copied",
                             hint="give a destination on another disk") from None  # fmt: skip
        return False
    source_stat = os.stat(source.path)
    same_device = stat.S_ISBLK(dest_stat.st_mode) and _number(dest_stat.st_rdev) in on_source
    if same_device or (dest_stat.st_dev, dest_stat.st_ino) == (source_stat.st_dev, source_stat.st_ino):
        raise UsageError(f"{dest} is the disk being copied (or a partition of it)", hint="give another destination")
    if not stat.S_ISBLK(dest_stat.st_mode) and _number(dest_stat.st_dev) in on_source:
        raise UsageError(f"{dest} is on the disk being copied", hint="give a destination on another disk")
    if stat.S_ISDIR(dest_stat.st_mode):
        raise UsageError(f"{dest} is a directory", hint="give a file name, or use --all DIR for every disk")
    if not stat.S_ISBLK(dest_stat.st_mode):
        return False
    if _with_partitions(dest_stat.st_rdev, sys_root) & _mounted_devices(mountinfo):
        raise UsageError(f"{dest} (or a partition of it) is mounted", hint="unmount it, or give another destination")
    fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < source.size:
        raise UsageError(f"{dest} holds {size} bytes, the disk {source.size}",
                         hint="give a destination at least as large")  # fmt: skip
    return True


def _open_destination(dest: Path, block_device: bool) -> int:
    flags = os.O_WRONLY | os.O_CLOEXEC
    if block_device:
        try:
            return os.open(dest, flags | os.O_EXCL)  # EBUSY while anything holds it (mounted, dm, RAID)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UsageError(f"{dest} is in use (mounted, or held by LVM, dm or RAID)",
                                 hint="release it, or give another destination") from None  # fmt: skip
            raise
    return os.open(dest, flags | os.O_CREAT, 0o600)


def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants


def _throttle(began: float, copied: int, rate: int) -> None:
    if rate > 0:
        ahead = copied / rate - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)


class Copier:
    def __init__(self, source: Source, dest: Path, opener: Opener = open_reader,
                 progress: Callable[[str, int, int], Progress] = Progress, environ: dict[str, str] | None = None,
                 block: int = BLOCK) -> None:  # fmt: skip
        self.source, self.dest, self.opener, self.progress = source, dest, opener, progress
        self.environ, self.block = environ, block

    def run(self, verify: bool = True) -> str:
        """Copy (or continue a copy), then check; the verdict line."""
        block_device = check_destination(self.source, self.dest)
        sidecar = sidecar_of(self.dest)
        record = Record.load(sidecar)
        if record is not None and (record.identity, record.size) != (self.source.identity, self.source.size):
            raise UsageError(f"{self.dest} holds part of another disk ({record.identity}, {record.size} bytes)",
                             hint=f"give another destination, or delete {self.dest} and {sidecar} to start over")
        if record is None and not block_device and self.dest.exists() and self.dest.stat().st_size:
            raise UsageError(f"{self.dest} exists and is no unfinished copy",
                             hint="give another destination, or delete it first")  # fmt: skip
        record = record or Record(self.source.identity, self.source.size, 0)
        if record.done < self.source.size:
            record = self._copy(record, block_device, sidecar)
        if not verify:
            return "copied (not verified: --no-verify)"
        if record.verified:
            return record.verified
        difference = self._verify()
        if difference is None:
            Record(record.identity, record.size, record.done, "identical").save(sidecar)
            return "identical"
        # The next run copies again from the block that differs, and checks everything again.
        Record(record.identity, record.size, difference // self.block * self.block).save(sidecar)
        return f"differ at offset {difference}"

    def _copy(self, record: Record, block_device: bool, sidecar: Path) -> Record:
        env = os.environ if self.environ is None else self.environ
        kill_at, rate = int(env.get(KILL_AT, "0") or 0), int(env.get(RATE, "0") or 0)
        size, done = self.source.size, record.done
        out = _open_destination(self.dest, block_device)
        reader = self.opener(self.source.path, False)
        ahead = ReadAhead(lambda view, at: _read_full(reader, view, at), size, self.block, start=done)
        blocks = ahead.blocks()
        progress = self.progress(f"copying {self.source.path}", size, done)
        try:
            if not block_device:
                # Past `done` DEST may hold blocks written before an interruption; a zero
                # block is skipped, not written, so those must read as zeros again.
                os.ftruncate(out, done)
                os.ftruncate(out, size)
            synced_at, synced_time, began, start = done, time.monotonic(), time.monotonic(), done
            while done < size:
                want = min(self.block, size - done)
                try:
                    _, view, got = next(blocks)
                except OSError as exc:
                    if exc.errno in GONE:
                        self._record(out, sidecar, record, done)
                        progress.finish(done)
                        raise TargetGone(done) from None
                    raise
                if got and (block_device or not _zeros(view)):
                    self._write(out, view, done)
                done += got
                if got < want:
                    raise CopyError(f"{self.source.path} ended at offset {done}, before its {size} bytes",
                                    hint="the disk shrank: run the copy again")  # fmt: skip
                progress.update(done)
                _throttle(began, done - start, rate)
                if done - synced_at >= SYNC_EVERY_BYTES or time.monotonic() - synced_time >= SYNC_EVERY_SECONDS or (
                        kill_at and done >= kill_at):  # fmt: skip
                    self._record(out, sidecar, record, done)
                    synced_at, synced_time = done, time.monotonic()
                    if kill_at and done >= kill_at:
                        import signal  # the test hook only

                        os.kill(os.getpid(), signal.SIGKILL)
            record = self._record(out, sidecar, record, done)
            progress.finish(done)
            return record
        finally:  # the buffers go with their last views (a traceback may hold one)
            ahead.close()
            reader.close()
            os.close(out)

    def _write(self, out: int, chunk: memoryview, offset: int) -> None:
        while chunk:
            try:
                written = os.pwrite(out, chunk, offset)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise CopyError(f"{self.dest}: no space left at offset {offset}",
                                    hint="free some space, then run the same command again to resume") from None
                raise
            chunk, offset = chunk[written:], offset + written

    @staticmethod
    def _record(out: int, sidecar: Path, record: Record, done: int) -> Record:
        os.fsync(out)  # DEST holds everything up to `done` before the record says so
        saved = Record(record.identity, record.size, done)
        saved.save(sidecar)
        return saved

    def _verify(self) -> int | None:
        """Both read anew and compared: the first offset where they differ, None if nowhere."""
        size = self.source.size
        source = self.opener(self.source.path, True)
        copy = self.opener(str(self.dest), True)
        ahead = ReadAhead(lambda view, at: _read_full(source, view, at), size, self.block)
        blocks = ahead.blocks()
        b = memoryview(_aligned(self.block))
        progress = self.progress(f"verifying {self.source.path}", size, 0)
        offset = 0
        try:
            while offset < size:
                want = min(self.block, size - offset)
                try:
                    _, a, got = next(blocks)
                except OSError as exc:
                    if exc.errno in GONE:
                        progress.finish(offset)
                        raise CopyError(f"target went away at offset {offset} while verifying",
                                        hint="run the same command again to verify") from None  # fmt: skip
                    raise
                mine = _read_full(copy, b[:want], offset)
                if got != want or mine != want or not _same(a, b[:want]):
                    progress.finish(offset)
                    return offset + _first_difference(a, b[:mine])
                offset += want
                progress.update(offset)
            progress.finish(offset)
            return None
        finally:
            ahead.close()
            source.close()
            copy.close()


# memoryview's == goes item by item, 15 times slower than memcmp; slicing the mmap for a bytes
# == copies the block into fresh memory first (a 4 MiB allocation, every page faulted in).
# bytes.startswith and bytearray's == take any buffer and are one memcmp.


def _zeros(chunk: memoryview) -> bool:
    """No copy, and stops at the first byte that is not zero."""
    return ZEROS.startswith(chunk)


def _same(a: memoryview, b: memoryview) -> bool:
    """One copy of `a` (into memory malloc reuses from block to block) and one memcmp."""
    return len(a) == len(b) and bytearray(a) == b


def _read_full(reader: Reader, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        count = reader.read_into(view[got:], offset + got)
        if count <= 0:
            break
        got += count
    return got


def _first_difference(a: memoryview, b: memoryview) -> int:
    step = 4096
    for start in range(0, max(len(a), len(b)), step):
        if a[start : start + step] != b[start : start + step]:
            x, y = bytes(a[start : start + step]), bytes(b[start : start + step])
            return start + next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return min(len(a), len(b))
