"""Private files under /run/storagetm: the directory 0700, each file 0600 whatever the
umask (they hold the DH-HMAC-CHAP secrets and the TLS key), written whole or not at all.
The standard library only: the initiator-side helper writes its records with it too."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def write_all(fd: int, data: bytes) -> None:
    """A full tmpfs takes part of a write and returns its length: never keep half a file."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Temp file, (fsync,) rename: a reader sees the old file or the new one. In a private
    directory (made 0700)."""
    private_directory(path.parent)
    replace_atomic(path, data, sync=sync)


def replace_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """write_atomic in a directory that is not ours to make private: a file 0600, replaced
    whole, the directory left as it is."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed instance with our pid
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_directory(directory: Path) -> None:
    """Make `directory` (0700), or make an existing one 0700: an older storagetm left it 0755."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, DIRECTORY_MODE)
    if stat.S_IMODE(os.lstat(directory).st_mode) != DIRECTORY_MODE:
        os.chmod(directory, DIRECTORY_MODE)
