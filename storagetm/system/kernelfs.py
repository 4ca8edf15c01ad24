"""Small kernel attribute files (sysfs, procfs), read without open()'s text-file machinery:
they are read for every udev event and every second for the dashboard, and under a slow
CPU that machinery costs more than the read itself."""

from __future__ import annotations

import os


def read_attribute(path: str | os.PathLike[str]) -> str:
    """The whole file as text; OSError as open() would raise it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")
