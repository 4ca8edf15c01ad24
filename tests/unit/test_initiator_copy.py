"""`storagetm copy` on regular files: the copy is identical and sparse, resumes where an
interruption (the target gone, the process killed) left it, is verified by reading both
again, and refuses destinations it must not write."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storagetm.errors import UsageError
from storagetm.initiator import copy as copying
from storagetm.initiator.copy import Copier, Reader, Source, TargetGone, open_reader, sidecar_of
from storagetm.initiator.progress import Progress
from storagetm.initiator.readahead import ReadAhead

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
NQN = "nqn.2023-10.io.systemd:storagetm.abc.qemu-disk-src1"


def make_source(path: Path, size: int = 24 * MIB) -> Source:
    """Data, then a long run of zeros (sparse in the copy), then data again."""
    with path.open("wb") as f:
        f.write(os.urandom(3 * MIB + 123))
        f.seek(size - 2 * MIB)
        f.write(os.urandom(2 * MIB))
    return Source(str(path), NQN, size)


def quiet(label: str, total: int, start: int) -> Progress:
    return Progress(label, total, start, stream=io.StringIO())


class FailingReader:
    """The target goes away: reads from `fail_at` on fail with EIO, as the kernel's do."""

    def __init__(self, inner: Reader, fail_at: int) -> None:
        self.inner, self.fail_at = inner, fail_at

    def read_into(self, buffer: memoryview, offset: int) -> int:
        if offset >= self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return self.inner.read_into(buffer, offset)

    def close(self) -> None:
        self.inner.close()


def test_copy_is_identical_and_sparse(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    assert Copier(source, dest, progress=quiet).run() == "identical"
    assert dest.read_bytes() == Path(source.path).read_bytes()
    assert dest.stat().st_blocks * 512 < 12 * MIB  # the 19 MiB of zeros were not written


def test_target_gone_mid_copy_then_the_same_command_resumes_and_verifies(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    opened: list[bool] = []

    def gone_at_8_mib(path: str, direct: bool) -> Reader:
        opened.append(direct)
        return FailingReader(open_reader(path, direct), 8 * MIB)

    with pytest.raises(TargetGone, match=r"^target went away at offset 8388608; run the same command again to resume$"):
        Copier(source, dest, opener=gone_at_8_mib, progress=quiet, block=MIB).run()
    assert TargetGone(1).one_line().endswith("(if storagetm restarted there, connect again first: storagetm connect)")
    assert json.loads(sidecar_of(dest).read_text())["done"] == 8 * MIB
    reads: list[int] = []

    def counting(path: str, direct: bool) -> Reader:
        reader = open_reader(path, direct)

        class Counting:
            def read_into(self, buffer: memoryview, offset: int) -> int:
                if not direct:
                    reads.append(offset)
                return reader.read_into(buffer, offset)

            def close(self) -> None:
                reader.close()

        return Counting()

    assert Copier(source, dest, opener=counting, progress=quiet, block=MIB).run() == "identical"
    assert min(reads) == 8 * MIB  # resumed, not started over
    assert dest.read_bytes() == Path(source.path).read_bytes()


def test_a_copy_killed_halfway_resumes(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    script = ("import sys; from pathlib import Path; from storagetm.initiator.copy import Copier, Source; "
              f"Copier(Source({source.path!r}, {NQN!r}, {source.size}), Path({str(dest)!r}), block=1 << 20).run()")
    env = dict(os.environ, STORAGETM_TEST_COPY_KILL_AT=str(10 * MIB), PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr
    assert json.loads(sidecar_of(dest).read_text())["done"] == 10 * MIB
    assert Copier(source, dest, progress=quiet).run() == "identical"


def test_verification_reads_the_copy_again_and_names_the_first_difference(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    assert Copier(source, dest, progress=quiet).run(verify=False) == "copied (not verified: --no-verify)"
    with dest.open("r+b") as f:  # what was written is not what the source holds
        f.seek(5 * MIB + 77)
        f.write(b"\xff")
    assert Copier(source, dest, progress=quiet).run() == f"differ at offset {5 * MIB + 77}"
    # The same command again copies from the block that differs, and then finds it identical.
    assert json.loads(sidecar_of(dest).read_text())["done"] == 4 * MIB
    assert Copier(source, dest, progress=quiet).run() == "identical"


def test_a_resume_past_stale_blocks_writes_the_zeros_they_must_become(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    # Copied up to 2 MiB; beyond, blocks an interrupted write left before it recorded them.
    dest.write_bytes(Path(source.path).read_bytes()[: 2 * MIB] + b"\xee" * (source.size - 2 * MIB))
    copying.Record(NQN, source.size, 2 * MIB).save(sidecar_of(dest))
    assert Copier(source, dest, progress=quiet).run() == "identical"


def test_refuses_the_source_itself_a_directory_and_a_file_that_is_no_copy(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    with pytest.raises(UsageError, match="is the disk being copied"):
        Copier(source, Path(source.path), progress=quiet).run()
    with pytest.raises(UsageError, match="is a directory"):
        Copier(source, tmp_path, progress=quiet).run()
    other = tmp_path / "precious.img"
    other.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists and is no unfinished copy"):
        Copier(source, other, progress=quiet).run()
    assert other.read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="does not exist"):
        Copier(source, tmp_path / "nowhere" / "x.img", progress=quiet).run()


def test_refuses_to_resume_a_copy_of_another_disk(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    copying.Record("nqn.other", source.size, MIB).save(sidecar_of(dest))
    with pytest.raises(UsageError, match="holds part of another disk"):
        Copier(source, dest, progress=quiet).run()


def test_a_finished_and_verified_copy_is_not_copied_again(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    assert Copier(source, dest, progress=quiet).run() == "identical"

    def no_reads(path: str, direct: bool) -> Reader:
        raise AssertionError("read again")

    assert Copier(source, dest, opener=no_reads, progress=quiet).run() == "identical"


def test_mounted_is_seen_through_its_partitions(tmp_path: Path) -> None:
    sys_root = tmp_path / "sys"
    part = sys_root / "dev/block/8:16/sdb1"
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("8:17\n")
    assert copying._with_partitions(os.makedev(8, 16), sys_root) == {"8:16", "8:17"}
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("36 35 8:17 / /mnt rw,relatime shared:1 - ext4 /dev/sdb1 rw\n")
    assert "8:17" in copying._mounted_devices(mountinfo)


def test_progress_is_one_line_on_a_terminal_with_rate_and_eta() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = [0.0]
    stream = Terminal()
    progress = Progress("copying /dev/nvme1n1", 100 * MIB, stream=stream, now=lambda: clock[0])
    clock[0] = 2.0
    progress.update(50 * MIB)
    clock[0] = 2.1
    progress.update(60 * MIB)  # not redrawn: a quarter second has not passed
    clock[0] = 4.0
    progress.finish(100 * MIB)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.startswith("\r")
    assert text.count("\r") == 2
    assert "50% 50.0 MiB of 100.0 MiB, 25.0 MiB/s, ETA 0:00:02" in text


def test_refuses_a_partition_of_the_source_and_a_file_on_its_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either would overwrite the disk being copied while it is read."""
    source = make_source(tmp_path / "disk")
    here = os.stat(tmp_path).st_dev
    monkeypatch.setattr(copying, "source_devices", lambda path, sys_root=None: {f"{os.major(here)}:{os.minor(here)}"})
    with pytest.raises(UsageError, match="is on the disk being copied"):
        Copier(source, tmp_path / "copy.img", progress=quiet).run()
    (tmp_path / "old.img").write_bytes(b"")
    with pytest.raises(UsageError, match="is on the disk being copied"):
        Copier(source, tmp_path / "old.img", progress=quiet).run()
    assert not (tmp_path / "copy.img").exists()


def test_the_source_devices_are_the_disk_and_its_partitions(tmp_path: Path) -> None:
    node = tmp_path / "nvme1n1"
    try:
        os.mknod(node, 0o600 | 0o060000, os.makedev(259, 0))  # S_IFBLK
    except PermissionError:
        pytest.skip("making a device node needs root")
    sys_root = tmp_path / "sys"
    part = sys_root / "dev/block/259:0/nvme1n1p1"
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("259:1\n")
    assert copying.source_devices(str(node), sys_root) == {"259:0", "259:1"}
    partition = tmp_path / "nvme1n1p1"
    os.mknod(partition, 0o600 | 0o060000, os.makedev(259, 1))
    with pytest.raises(UsageError, match="is the disk being copied"):
        copying.check_destination(Source(str(node), NQN, MIB), partition, sys_root=sys_root)
    assert copying.source_devices(str(tmp_path / "nvme1n1p1"), tmp_path / "none") == {"259:1"}


def test_the_helper_records_are_written_whole_synced_and_private(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import stat

    from storagetm.initiator import record

    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mine = tmp_path / "helper"
    record.save([record.Connection("nvme1", NQN, "t.local", "169.254.1.2")], mine / "connected.json")
    assert record.load(mine / "connected.json") == [record.Connection("nvme1", NQN, "t.local", "169.254.1.2")]
    assert stat.S_IMODE(os.stat(mine / "connected.json").st_mode) == 0o600 and len(synced) == 1
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o700 and os.listdir(mine) == ["connected.json"]
    theirs = tmp_path / "backups"
    theirs.mkdir(mode=0o755)
    os.chmod(theirs, 0o755)
    copying.Record(NQN, MIB, MIB).save(theirs / "disk.img.storagetm")
    assert stat.S_IMODE(os.stat(theirs / "disk.img.storagetm").st_mode) == 0o600 and len(synced) == 2
    assert stat.S_IMODE(os.stat(theirs).st_mode) == 0o755 and os.listdir(theirs) == ["disk.img.storagetm"]


def test_the_block_tests_see_a_single_byte_anywhere() -> None:
    block = bytearray(copying.BLOCK)
    assert copying._zeros(memoryview(block)) and copying._zeros(memoryview(block)[:4097])
    assert copying._same(memoryview(block), memoryview(bytes(copying.BLOCK)))
    for where in (0, 4096, copying.BLOCK - 1):
        other = bytearray(block)
        other[where] = 1
        assert not copying._zeros(memoryview(other))
        assert not copying._same(memoryview(block), memoryview(other))
        assert not copying._same(memoryview(other), memoryview(block))
    assert not copying._same(memoryview(block), memoryview(block)[:-1])  # a short read is no match
    assert not copying._zeros(memoryview(bytes(copying.BLOCK + 1)))  # larger than ZEROS: written, not skipped


def test_the_target_gone_while_verifying_says_so_at_its_offset(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk")
    dest = tmp_path / "copy.img"
    assert Copier(source, dest, progress=quiet, block=MIB).run(verify=False).startswith("copied")

    def gone_when_read_again(path: str, direct: bool) -> Reader:
        reader = open_reader(path, direct)
        return FailingReader(reader, 5 * MIB) if direct and path == source.path else reader

    with pytest.raises(copying.CopyError, match=r"^target went away at offset 5242880 while verifying$"):
        Copier(source, dest, opener=gone_when_read_again, progress=quiet, block=MIB).run()
    assert Copier(source, dest, progress=quiet, block=MIB).run() == "identical"  # the same command again


def read_from(data: bytes, reads: list[int], fail_at: int = -1) -> Callable[[memoryview, int], int]:
    def read(view: memoryview, offset: int) -> int:
        reads.append(offset)
        if offset == fail_at:
            raise OSError(errno.EIO, "Input/output error")
        chunk = data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        return len(chunk)

    return read


def test_read_ahead_hands_out_every_block_in_order_and_stops_at_an_error() -> None:
    data = os.urandom(5 * 4096 + 100)
    reads: list[int] = []
    ahead = ReadAhead(read_from(data, reads), len(data), 4096)
    got = [(offset, bytes(view), count) for offset, view, count in ahead.blocks()]
    ahead.close()
    assert [offset for offset, _, _ in got] == [0, 4096, 8192, 12288, 16384, 20480] == reads
    assert b"".join(chunk for _, chunk, _ in got) == data and got[-1][2] == 100
    failing = ReadAhead(read_from(data, [], fail_at=8192), len(data), 4096)
    seen: list[int] = []
    with pytest.raises(OSError, match="Input/output error"):
        seen.extend(offset for offset, _, _ in failing.blocks())
    failing.close()
    assert seen == [0, 4096] and not failing.thread.is_alive()


def test_read_ahead_is_one_block_ahead_and_close_stops_it() -> None:
    data = os.urandom(64 * 4096)
    reads: list[int] = []
    ahead = ReadAhead(read_from(data, reads), len(data), 4096)
    blocks = ahead.blocks()
    assert next(blocks)[0] == 0
    deadline = time.monotonic() + 5
    while len(reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # time enough to read further, if it would
    assert reads == [0, 4096]  # the block handed out, and the next one: two buffers
    ahead.close()
    assert not ahead.thread.is_alive() and len(reads) <= 3


def test_read_ahead_starts_where_a_resumed_copy_does() -> None:
    data = os.urandom(8 * 4096)
    reads: list[int] = []
    ahead = ReadAhead(read_from(data, reads), len(data), 4096, start=5 * 4096)
    assert [offset for offset, _, _ in ahead.blocks()] == [5 * 4096, 6 * 4096, 7 * 4096] == reads
    ahead.close()


def test_a_disk_that_ends_before_its_size_is_an_error_at_that_offset(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk", 6 * MIB)
    claimed = Source(source.path, NQN, 8 * MIB)
    dest = tmp_path / "copy.img"
    with pytest.raises(copying.CopyError, match=rf"ended at offset {6 * MIB}, before its {8 * MIB} bytes"):
        Copier(claimed, dest, progress=quiet, block=4 * MIB).run()
    assert dest.read_bytes()[: 6 * MIB] == Path(source.path).read_bytes()


def test_the_copy_reads_past_the_page_cache_where_the_file_system_allows(tmp_path: Path) -> None:
    source = make_source(tmp_path / "disk", 4 * MIB)
    try:
        os.close(os.open(source.path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    for fresh in (False, True):
        reader = copying.FileReader(source.path, fresh)
        try:
            assert reader.direct and os.O_DIRECT & fcntl.fcntl(reader.fd, fcntl.F_GETFL)
        finally:
            reader.close()


def test_read_ahead_hands_on_any_error_of_its_read() -> None:
    def broken(view: memoryview, offset: int) -> int:
        raise ValueError("not a disk")

    ahead = ReadAhead(broken, 3 * 4096, 4096)
    with pytest.raises(ValueError, match="not a disk"):
        next(ahead.blocks())
    ahead.close()
