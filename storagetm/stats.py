"""I/O counters of exported disks and the initiators connected, for the dashboard.

nvmet reads and writes its backing device through the block layer, so the device's own
counters in /sys/class/block/<name>/stat are the initiators' traffic (this image runs
nothing else on those disks)."""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path

from storagetm.kernelfs import read_attribute

SECTOR = 512
SYS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class Counters:
    read_bytes: int
    written_bytes: int
    at: float  # time.monotonic() of the sample


@dataclass(frozen=True)
class DiskActivity:
    """Since storagetm started exporting the disk."""

    read_bytes: int
    written_bytes: int
    read_rate: float  # bytes/s over the last interval
    write_rate: float
    read_fraction: float  # bytes read / disk size, capped at 1: how far a full copy has got


def block_name(path: str) -> str:
    """Kernel name (sda, dm-3) of a block device path such as /dev/mapper/x."""
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return ""
    link = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    return link.resolve().name if link.exists() else ""


def read_counters(name: str, sys_block: Path = SYS_BLOCK) -> Counters | None:
    try:
        fields = read_attribute(sys_block / name / "stat").split()
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
