"""Block devices from udev: a monitor started before enumeration, so nothing is missed."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storagetm.disks.disk import Disk, disk_from_udev

UDEV_QUEUE = Path("/run/udev/queue")  # exists while udevd has events to process (libudev's udev_queue)


def udev_settled(queue: Path = UDEV_QUEUE) -> bool:
    return not queue.exists()


@dataclass(frozen=True)
class DiskEvent:
    action: str  # "add", "change", "remove", …
    disk: Disk


class BlockDevices:
    """Wraps pyudev: `fileno()` for a selector, `events()` to drain it."""

    def __init__(self, context: Any = None, monitor: Any = None, *, partition_uuids: bool = True) -> None:
        if context is None:
            import pyudev

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            monitor.filter_by("block")
        self.context = context
        self.monitor = monitor
        self.partition_uuids = partition_uuids  # see disk_from_udev

    def start(self) -> None:
        self.monitor.start()

    def fileno(self) -> int:
        return int(self.monitor.fileno())

    def enumerate(self) -> list[Disk]:
        """Disks udev has finished with: storagetm starts early in boot, and a disk udev has
        not processed yet (no serial, no by-id links) arrives later as an event."""
        devices = self.context.list_devices(subsystem="block")
        return [disk_from_udev(device, partition_uuids=self.partition_uuids)
                for device in devices if device.is_initialized]  # fmt: skip

    def events(self) -> Iterator[DiskEvent]:
        for device in iter(functools.partial(self.monitor.poll, timeout=0), None):
            yield DiskEvent(device.action or "change", disk_from_udev(device, partition_uuids=self.partition_uuids))
