"""The backing objects of an export, and their drivers.

- hold: a shared BSD lock on a block device while it is exported (partitioning tools that
  take the exclusive lock fail; udev, which takes a shared one, still probes). A process
  resource, not a kernel object: a restarted storagetm takes it again.
- loop: a loop device over a file (an exported file under device-mapper, or a snapshot's
  store file); found by its backing file when its make was cut short.
- store: a snapshot's copy-on-write store: a tmpfs of its own (so a full store never fills
  /run) holding one sparse file of the store's size.
- dm: the device-mapper device nvmet exports (modes.py says why flakey and snapshot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from msgspec import Struct, field

from storagetm.backing import modes
from storagetm.backing.modes import Mode, System
from storagetm.model import Device, Export
from storagetm.reconcile.objects import BaseDriver, Driver, Facts, FactsOf, Key, Obj, make
from storagetm.system.log import Logger

log = Logger(__name__)

HOLD, LOOP, STORE, DM = "hold", "loop", "store", "dm"
STORE_FILE = "store.cow"


def store_file(system: System, name: str) -> str:
    return str(system.cow_dir / name / STORE_FILE)


class BackingLayer(Struct, frozen=True):
    system: System = field(default_factory=System)

    def objects(self, export: Export) -> tuple[list[Obj], Device]:
        """The objects that make the device `export` is offered on, and that device."""
        disk, group = export.disk, export.nqn
        objs: list[Obj] = []
        origin: Key | None = None
        if not disk.is_file:
            objs.append(make(HOLD, disk.devnode, group=group))
            origin = objs[-1].key
        if export.mode is Mode.READ_WRITE:
            return objs, Device(disk.devnode, origin)
        if disk.is_file:
            objs.append(make(LOOP, disk.devnode, {"file": disk.devnode, "mode": export.mode.value}, group=group))
            origin = objs[-1].key
        name = modes.dm_name_for(export.nqn, export.mode)
        attrs = {"mode": export.mode.value, "sectors": str(disk.size // modes.SECTOR), "origin": disk.devnode,
                 "origin_loop": disk.devnode if disk.is_file else ""}  # fmt: skip
        needs = [origin] if origin else []
        if export.mode is Mode.SNAPSHOT:
            store = make(STORE, name, {"size": str(export.snapshot_size)}, group=group)
            path = store_file(self.system, name)
            cow = make(LOOP, path, {"file": path}, needs=(store.key,), group=group)
            objs += [store, cow]
            needs.append(cow.key)
            attrs |= {"cow_loop": path, "chunk": str(modes.SNAPSHOT_CHUNK_SECTORS)}
        objs.append(make(DM, name, attrs, needs=needs, group=group))
        return objs, Device(f"/dev/mapper/{name}", objs[-1].key)

    def drivers(self) -> Sequence[Driver]:
        return (HoldDriver(), LoopDriver(self.system), StoreDriver(self.system), DeviceMapperDriver(self.system))


class HoldDriver(BaseDriver):
    kind, rank = HOLD, 1

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def present(self, obj: Obj, facts: Facts) -> bool:
        return obj.name in self.fds or facts.get("held") == "1"

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        self.adopt(obj, {})
        return {"held": "1"}

    def adopt(self, obj: Obj, facts: Facts) -> None:
        if obj.name in self.fds:
            return
        try:
            fd = os.open(obj.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise modes.BackingError(f"cannot open {obj.name}: {exc.strerror}",
                                     hint="is the device still there?") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            log.warning("%s is locked by another program; exporting it anyway", obj.name)
        self.fds[obj.name] = fd

    def remove(self, obj: Obj, facts: Facts) -> None:
        fd = self.fds.pop(obj.name, None)
        if fd is not None:
            os.close(fd)

    def discard_partial(self, obj: Obj) -> None:
        self.remove(obj, {})


def loops_over(path: str, sys_block: Path = Path("/sys/block")) -> list[str]:
    """The loop devices whose backing file is `path`."""
    found = []
    for backing in sorted(sys_block.glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().removesuffix(" (deleted)") == path:
                found.append(f"/dev/{backing.parent.parent.name}")
    return found


def _mode(loop: Obj) -> Mode:
    """The mode a loop device is for, as its errors name it (a snapshot's store: snapshot)."""
    return Mode(loop.attr("mode", Mode.SNAPSHOT.value))


class LoopDriver(BaseDriver):
    kind, rank = LOOP, 2

    def __init__(self, system: System) -> None:
        self.system = system
        self.sys_block = system.sys_block

    def present(self, obj: Obj, facts: Facts) -> bool:
        device = facts.get("device", "")
        return bool(device) and f"/dev/{device.rpartition('/')[2]}" in loops_over(obj.attr("file"), self.sys_block)

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        device = modes.run(self.system, _mode(obj), "losetup", "--find", "--show", obj.attr("file")).strip()
        return {"device": device}

    def remove(self, obj: Obj, facts: Facts) -> None:
        if self.present(obj, facts):
            modes.run(self.system, _mode(obj), "losetup", "--detach", facts["device"])

    def discard_partial(self, obj: Obj) -> None:
        for device in loops_over(obj.attr("file"), self.sys_block):
            modes.run(self.system, _mode(obj), "losetup", "--detach", device)


class StoreDriver(BaseDriver):
    kind, rank = STORE, 3

    def __init__(self, system: System) -> None:
        self.system = system

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.system.mounted(self.system.cow_dir / obj.name)

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        size = modes.store_size(self.system, int(obj.attr("size", "0")))
        store = modes.store_create(self.system, obj.name, size)
        return {"size": str(size), "dir": str(store)}

    def foreign(self, obj: Obj) -> bool:
        return False  # COW_DIR is storagetm's own: a store a crash left there is removed first

    def remove(self, obj: Obj, facts: Facts) -> None:
        modes.store_remove(self.system, self.system.cow_dir / obj.name)


class DeviceMapperDriver(BaseDriver):
    kind, rank = DM, 4

    def __init__(self, system: System) -> None:
        self.system = system
        self.sys_block = system.sys_block

    def present(self, obj: Obj, facts: Facts) -> bool:
        return obj.name in dm_names(self.sys_block)

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        mode = Mode(obj.attr("mode"))
        origin = facts_of((LOOP, obj.attr("origin_loop")))["device"] if obj.attr("origin_loop") else obj.attr("origin")
        sectors = obj.attr("sectors")
        modes.run(self.system, mode, "modprobe", "dm_flakey" if mode is Mode.READ_ONLY else "dm_snapshot")
        if mode is Mode.READ_ONLY:
            table = f"0 {sectors} flakey {origin} 0 0 1 1 error_writes"
        else:
            cow = facts_of((LOOP, obj.attr("cow_loop")))["device"]
            table = f"0 {sectors} snapshot {origin} {cow} N {obj.attr('chunk')}"
        # A failed `dmsetup create` removes the device it made itself (libdevmapper reverts).
        modes.run(self.system, mode, "dmsetup", "create", obj.name, "--table", table)
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        modes.remove_dm(self.system, obj.name)

    def discard_partial(self, obj: Obj) -> None:
        if self.present(obj, {}):
            modes.remove_dm(self.system, obj.name)


def dm_names(sys_block: Path = Path("/sys/block")) -> set[str]:
    names = set()
    for path in sys_block.glob("dm-*/dm/name"):
        with contextlib.suppress(OSError):
            names.add(path.read_text().strip())
    return names
