"""Which disks the web page offers, under which names, read from which device.

Only what is exported, named only by its kernel name from the exports list: a URL can name
nothing else (no path is ever built from it). Each is read from the device the initiator is
offered (the Backing: the disk itself read-write, the device-mapper device read-only or in
snapshot mode), opened O_RDONLY: a download shows the disk as the initiator sees it now
(in snapshot mode with the initiator's writes), and never writes to anything."""

from __future__ import annotations

import os
import re

from msgspec import Struct

from storagetm.backing.modes import Mode
from storagetm.model import Export
from storagetm.state import RunState

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Image(Struct, frozen=True):
    name: str  # in URLs: /disks/<name>.img
    export: Export
    path: str  # the device the initiator is offered

    @property
    def mode(self) -> Mode:
        return self.export.mode


def images(state: RunState) -> dict[str, Image]:
    """By name. A name that is not plain, or a second disk of the same name, is not offered."""
    found: dict[str, Image] = {}
    for nqn, export in sorted(state.exports.items()):
        name = export.disk.name
        if not SAFE_NAME.fullmatch(name) or name in found:
            continue
        backing = state.backings.get(nqn)
        found[name] = Image(name, export, backing.path if backing else export.disk.devnode)
    return found


def open_read_only(path: str) -> tuple[int, int]:
    """(fd, size in bytes): the size as the device says it now, not as it was at export.

    The kernel's targets write around the page cache (bios, or O_DIRECT on a file), so a
    page cached by an earlier read (a download, udev's probe during the export) would
    still hold what was there before the initiator wrote: the clean pages are dropped and
    the bytes come from the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd, size
    except OSError:
        os.close(fd)
        raise
