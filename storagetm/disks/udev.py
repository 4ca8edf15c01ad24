"""Block devices from the kernel's uevents first, udev's after: two monitors, started before
enumeration, so nothing is missed.

The kernel's event is the source of truth where disk_from_sysfs can tell the disk's identity
(storagetm/disks/kernel.py): the disk is exported without waiting for udev's rules. udev's later
event for the same device only refines what no identity depends on: its /dev/disk names, the
file-system label (which can only add a reason not to export) and the optical-drive flag (the
same). A disk the kernel path cannot name waits for udev's event, as before.
"""

from __future__ import annotations

import functools
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msgspec import Struct
from msgspec.structs import replace

from storagetm.disks.disk import Disk, disk_from_udev, sysfs_int
from storagetm.disks.kernel import disk_from_sysfs
from storagetm.disks.policy import MEDIA_LABELS
from storagetm.disks.uevents import KernelUevents
from storagetm.system.log import Logger

log = Logger(__name__)

UDEV_QUEUE = Path("/run/udev/queue")  # exists while udevd has events to process (libudev's udev_queue)
IDENTITY_FIELDS = ("model", "serial", "wwn")


def udev_settled(queue: Path = UDEV_QUEUE) -> bool:
    return not queue.exists()


class DiskEvent(Struct, frozen=True):
    action: str  # "add", "change", "remove", …
    disk: Disk


class _Known(Struct):
    """What the kernel said of one device: its disk (None: it waits for udev) and udev's view."""

    disk: Disk | None
    seqnum: int
    udev: Disk | None = None


def refine(kernel: Disk, udev: Disk) -> Disk:
    """The kernel's disk with what udev adds. The identity stays the kernel's: it is what the
    export was made with. A label or optical flag only udev saw still keeps the disk out."""
    label = kernel.fs_label if kernel.fs_label in MEDIA_LABELS else (udev.fs_label or kernel.fs_label)
    return replace(kernel, bus=udev.bus or kernel.bus, by_id=udev.by_id, by_path=udev.by_path,
                   cdrom=kernel.cdrom or udev.cdrom, fs_label=label, names_pending=False)  # fmt: skip


def identity_mismatch(kernel: Disk, udev: Disk) -> list[str]:
    return [f"{name} {getattr(udev, name)!r} (sysfs: {getattr(kernel, name)!r})"
            for name in IDENTITY_FIELDS if getattr(kernel, name) != getattr(udev, name)]  # fmt: skip


class BlockDevices:
    """Wraps pyudev: `fileno()` for a selector (readable when either monitor has events),
    `events()` to drain both."""

    def __init__(self, context: Any = None, monitor: Any = None, kernel_monitor: Any = None, *,
                 partition_uuids: bool = True) -> None:  # fmt: skip
        if context is None:
            import pyudev

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            monitor.filter_by("block")
            kernel_monitor = KernelUevents()
        self.context = context
        self.monitor = monitor
        self.kernel_monitor = kernel_monitor
        self.partition_uuids = partition_uuids  # see disk_from_udev
        self.known: dict[str, _Known] = {}  # sys_path -> what the kernel said of it
        self.gone: dict[str, int] = {}  # sys_path -> seqnum of the kernel's remove event
        self._poll: select.epoll | None = None

    def _monitors(self) -> list[Any]:
        return [m for m in (self.kernel_monitor, self.monitor) if m is not None]

    def start(self) -> None:
        for monitor in self._monitors():
            monitor.start()

    def fileno(self) -> int:
        if self._poll is None:
            self._poll = select.epoll()
            for monitor in self._monitors():
                self._poll.register(monitor.fileno(), select.EPOLLIN)
        return self._poll.fileno()

    def close(self) -> None:
        if self._poll is not None:
            self._poll.close()
            self._poll = None
        if isinstance(self.kernel_monitor, KernelUevents):
            self.kernel_monitor.close()

    def enumerate(self) -> list[Disk]:
        """Every block device in sysfs the kernel path can name now, refined where udev has
        already finished with it; the others as udev has finished them. A disk neither can
        name yet arrives later as an event."""
        disks: list[Disk] = []
        for device in self.context.list_devices(subsystem="block"):
            disk = self._from_kernel(device, seqnum=0)
            if device.is_initialized:
                disk = self._from_udev(device)
            if disk is not None:
                disks.append(disk)
        return disks

    def events(self) -> Iterator[DiskEvent]:
        """The kernel's events first: udev's for the same change always come after them."""
        if self.kernel_monitor is not None:
            for device in iter(functools.partial(self.kernel_monitor.poll, timeout=0), None):
                yield from self._kernel_event(device)
        for device in iter(functools.partial(self.monitor.poll, timeout=0), None):
            yield from self._udev_event(device)

    # ---- one event ---------------------------------------------------------------------

    def _kernel_event(self, device: Any) -> Iterator[DiskEvent]:
        action = device.action or "change"
        if getattr(device, "subsystem", "block") != "block":  # libudev filters; this holds if it did not
            return
        log.debug("kernel %s %s", action, device.sys_name)
        if action == "remove":
            known = self.known.pop(device.sys_path, None)
            self.gone[device.sys_path] = int(getattr(device, "sequence_number", 0) or 0)
            previous = None if known is None else known.disk or known.udev
            yield DiskEvent("remove", previous or _bare(device))
            return
        disk = self._from_kernel(device, seqnum=int(getattr(device, "sequence_number", 0) or 0))
        if disk is not None:
            yield DiskEvent(action, disk)

    def _udev_event(self, device: Any) -> Iterator[DiskEvent]:
        action = device.action or "change"
        known = self.known.get(device.sys_path)
        seqnum = int(getattr(device, "sequence_number", 0) or 0)
        present = os.path.exists(device.sys_path)
        if action == "remove" or not present:
            if known is not None and not present:  # the kernel's own remove event was lost
                yield from self._kernel_event(_Removed(device))
            return
        if seqnum and seqnum <= self.gone.get(device.sys_path, 0):
            return  # udev's view of a device the kernel removed since (another may sit there now)
        if known is None:  # the kernel's event was lost (a full socket buffer): read sysfs now
            self._from_kernel(device, seqnum=seqnum)
        elif seqnum and known.seqnum and seqnum < known.seqnum:
            return  # udev's view of an older state of the device: the kernel has said more since
        disk = self._from_udev(device)
        if disk is not None:
            yield DiskEvent(action, disk)

    # ---- the two sources ---------------------------------------------------------------

    def _from_kernel(self, device: Any, seqnum: int) -> Disk | None:
        """The disk from sysfs, remembered for the udev event that follows; refined with what
        udev said before, if the kernel said nothing since that changes it."""
        if hidden(device.sys_path):
            return None
        disk = disk_from_sysfs(device, partition_uuids=self.partition_uuids)
        previous = self.known.get(device.sys_path)
        udev = previous.udev if previous is not None else None
        self.known[device.sys_path] = _Known(disk, seqnum, udev)
        if disk is not None and udev is not None:
            disk = refine(disk, udev) if disk.serial else udev  # no identity of its own: udev's
        return disk

    def _from_udev(self, device: Any) -> Disk | None:
        if hidden(device.sys_path):
            return None
        known = self.known.setdefault(device.sys_path, _Known(None, 0))
        # The kernel path could not name it, or gave it no identity (a device never exported:
        # partition, optical, virtual): udev's disk, as it always was.
        if known.disk is None or not known.disk.serial:
            known.udev = disk_from_udev(device, partition_uuids=self.partition_uuids)
            return known.udev
        # The kernel path already read the partition table; only udev's names are new.
        known.udev = disk_from_udev(device, partition_uuids=False)
        if mismatch := identity_mismatch(known.disk, known.udev):
            log.warning("udev names %s %s; keeping the kernel's, which its export uses",
                        known.disk.devnode, ", ".join(mismatch))  # fmt: skip
        return refine(known.disk, known.udev)


def hidden(sys_path: str) -> bool:
    """A hidden gendisk (`hidden` is 1): native NVMe multipath's per-controller path device
    (nvme0c0n1), which has no device node; the multipath head (nvme0n1) is the disk. Its
    identity is the head's, so exporting it would also take the head's NQN."""
    return sysfs_int(os.path.join(sys_path, "hidden")) == 1


class _Removed:
    """A udev device seen gone from sysfs, as a kernel remove event."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.action = "remove"
        self.sys_path = device.sys_path
        self.sys_name = device.sys_name
        self.device_node = device.device_node
        self.device_number = device.device_number
        self.device_type = device.device_type


def _bare(device: Any) -> Disk:
    name = device.sys_name
    return Disk(name=name, devnode=device.device_node or f"/dev/{name}", devnum=device.device_number or 0,
                devtype=device.device_type or "", size=0)  # fmt: skip
