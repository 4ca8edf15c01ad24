"""Packet captures of the VM link (QEMU's filter-dump on the target's netdev), to check
what an eavesdropper on the wire would see."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from testbed import VMError
from testbed.initiator import Remote
from testbed.machine import VM

MARKER_BLOCK = 4096


def marker() -> bytes:
    """A string no disk holds by chance, new for each test."""
    return f"storagetm-capture-marker-{secrets.token_hex(8)}|".encode()


@contextlib.contextmanager
def capture(target: VM, name: str) -> Iterator[Path]:
    """Everything crossing the target's link while the block runs, as a pcap file."""
    path = target.workdir / f"{name}.pcap"
    path.unlink(missing_ok=True)
    reply = target.qmp.cmd("object-add", **{"qom-type": "filter-dump", "id": name, "netdev": "link",
                                             "file": str(path)})  # fmt: skip
    if isinstance(reply, dict) and "error" in reply:
        raise VMError(f"filter-dump: {reply['error']}")
    try:
        yield path
    finally:
        target.qmp.cmd("object-del", id=name)


def write_marker(initiator: VM, remote: Remote, text: bytes, offset_mib: int = 4) -> None:
    """Fill one block of the remote disk with copies of `text` (written through the link)."""
    block = (text * (MARKER_BLOCK // len(text) + 1))[:MARKER_BLOCK]
    initiator.sh(f"printf '%s' '{block.decode()}' | dd of=/dev/{remote.block} bs={MARKER_BLOCK} "
                 f"seek={offset_mib * 256} oflag=direct conv=notrunc status=none")  # fmt: skip


def read_remote(initiator: VM, remote: Remote, size_mib: int = 8) -> bytes:
    """Read the first `size_mib` MiB of the remote disk, bypassing the initiator's cache, and
    return the first marker string found in what was read."""
    return initiator.sh(f"dd if=/dev/{remote.block} bs=1M count={size_mib} iflag=direct status=none | "
                        f"grep -a -o 'storagetm-capture-marker-[0-9a-f]*' | head -n 1").encode()  # fmt: skip
