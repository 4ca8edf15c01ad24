"""I/O counters of exported disks and the initiators connected, for the dashboard.

nvmet reads and writes its backing device through the block layer, so the device's own
counters in /sys/dev/block/<major>:<minor>/stat are the initiators' traffic (this image runs
nothing else on those disks)."""

from __future__ import annotations

import ipaddress
import os
import stat
import time
from pathlib import Path

from msgspec import Struct

from storagetm.system.kernelfs import read_attribute

SECTOR = 512
SYS_DEV_BLOCK = "/sys/dev/block"


class Counters(Struct, frozen=True):
    read_bytes: int
    written_bytes: int
    at: float  # time.monotonic() of the sample


class DiskActivity(Struct, frozen=True):
    """Since storagetm started exporting the disk."""

    read_bytes: int
    written_bytes: int
    read_rate: float  # bytes/s over the last interval
    write_rate: float
    read_fraction: float  # bytes read / disk size, capped at 1: how far a full copy has got


def device_number(path: str) -> int | None:
    """The device number of a block device (/dev/sda, /dev/mapper/x); None for anything else:
    a file exported through nvmet's file backend has no block-layer counters."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def read_counters(devnum: int, sys_dev_block: str = SYS_DEV_BLOCK) -> Counters | None:
    """By device number: /sys/dev/block/MAJ:MIN needs no name, so no symlink to resolve."""
    try:
        fields = read_attribute(f"{sys_dev_block}/{os.major(devnum)}:{os.minor(devnum)}/stat").split()
    except OSError:
        return None
    return Counters(int(fields[2]) * SECTOR, int(fields[6]) * SECTOR, time.monotonic())


def activity(first: Counters, previous: Counters, now: Counters, size: int) -> DiskActivity:
    span = max(now.at - previous.at, 1e-6)
    read = now.read_bytes - first.read_bytes
    return DiskActivity(
        read_bytes=read,
        written_bytes=now.written_bytes - first.written_bytes,
        read_rate=(now.read_bytes - previous.read_bytes) / span,
        write_rate=(now.written_bytes - previous.written_bytes) / span,
        read_fraction=min(1.0, read / size) if size else 0.0,
    )


class ActivityMeter:
    """Counters of each exported disk since its export, sampled about once a second.

    The device is looked up by path on every sample (one stat(), no symlink resolved in
    user space): a disk unplugged and plugged back is exported again under the same NQN,
    possibly with another device number, and its counts then start from zero."""

    def __init__(self, sys_dev_block: str = SYS_DEV_BLOCK) -> None:
        self.sys_dev_block = sys_dev_block
        self.first: dict[str, tuple[int, Counters]] = {}  # key -> (device number, counters at export)
        self.last: dict[str, Counters] = {}

    def sample(self, exported: dict[str, tuple[str, int]]) -> dict[str, DiskActivity]:
        """`exported`: key (NQN) -> (block device path, disk size)."""
        for gone in set(self.first) - set(exported):
            del self.first[gone]
            self.last.pop(gone, None)
        current: dict[str, DiskActivity] = {}
        for key, (path, size) in exported.items():
            devnum = device_number(path)
            if devnum is None or (now := read_counters(devnum, self.sys_dev_block)) is None:
                continue
            devnum_then, first = self.first.get(key, (devnum, now))
            previous = self.last.get(key, now)
            if devnum_then != devnum or now.read_bytes < first.read_bytes or now.written_bytes < first.written_bytes:
                first = previous = now
            self.first[key] = (devnum, first)
            self.last[key] = now
            current[key] = activity(first, previous, now, size)
        return current


TCP_ESTABLISHED = "01"
PROC_NET = Path("/proc/net")


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return str(ipaddress.IPv4Address(words))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped or address)


def parse_proc_net_tcp(text: str, ports: set[int]) -> set[str]:
    """Peers of established connections to `ports`, from /proc/net/tcp or tcp6."""
    peers: set[str] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
            continue
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port in ports:
            peers.add(_address(fields[2].rsplit(":", 1)[0]))
    return peers


def initiators(ports: set[int], proc_net: Path = PROC_NET) -> list[str]:
    """Read once a second for the dashboard: from /proc, not by running `ss` each time."""
    peers: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            peers |= parse_proc_net_tcp(read_attribute(proc_net / name), ports)
        except OSError:
            continue
    return sorted(peers)
