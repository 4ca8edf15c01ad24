"""What `storagetm connect` connected, so that `storagetm disconnect` takes away that and
nothing else (not the machine's own NVMe-oF disks). In /run: gone with the connections at
reboot. A NamedTuple, not a dataclass: the helper starts sooner without dataclasses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from storagetm.statefile import write_atomic

RECORD = Path("/run/storagetm-helper/connected.json")


class Connection(NamedTuple):
    controller: str  # nvmeN
    nqn: str
    target: str  # what the target was called: its mDNS name or address
    address: str


def load(path: Path | None = None) -> list[Connection]:
    path = path or RECORD
    try:
        return [Connection(**entry) for entry in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError):
        return []  # damaged: disconnect then finds nothing of ours, which is the safe side


def save(connections: list[Connection], path: Path | None = None) -> None:
    write_atomic(path or RECORD, json.dumps([c._asdict() for c in connections]).encode())
