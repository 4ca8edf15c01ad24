"""I/O counters of exported disks and the initiators connected, for the dashboard.

nvmet reads and writes its backing device through the block layer, so the device's own
counters in /sys/class/block/<name>/stat are the initiators' traffic (this image runs
nothing else on those disks)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
        fields = (sys_block / name / "stat").read_text().split()
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


_PEER = re.compile(r"\s(\S+):(4420|8009|\d+)\s+(\S+?):(\d+)\s*$")


def parse_ss(output: str, ports: set[int]) -> list[str]:
    """Peer addresses of established TCP connections to our ports, from `ss -Htn`."""
    peers: set[str] = set()
    for line in output.splitlines():
        match = _PEER.search(line)
        if match and int(match.group(2)) in ports:
            peer = match.group(3).strip("[]")
            peers.add(peer.removeprefix("::ffff:"))
    return sorted(peers)


def initiators(ports: set[int]) -> list[str]:
    result = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=False)
    return parse_ss(result.stdout, ports) if result.returncode == 0 else []
