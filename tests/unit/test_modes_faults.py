"""Snapshot and read-only backings when the machine says no: a missing or failing tool
at any step, or too little RAM for a store. Nothing made before the failure stays, and
the export that needed it is not offered; the others are."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from storagetm.backing import modes
from storagetm.backing.layer import DM, BackingLayer
from storagetm.backing.modes import (
    DEFAULT_STORE_SIZE,
    MIN_STORE_SIZE,
    RAM_RESERVE,
    BackingError,
    Mode,
    System,
    store_size,
)
from storagetm.disks.disk import Disk
from storagetm.disks.identity import identity_for
from storagetm.model import Export
from storagetm.reconcile.journal import Journal
from storagetm.reconcile.reconciler import Failure, Reconciler
from tests.unit import fake_machine
from tests.unit.test_exports import ANCHOR, BASE, Target

GiB, MiB = 1 << 30, 1 << 20


class FakeMachine(fake_machine.FakeMachine):
    """The shared fake machine, and: `fail` makes the first command starting with it fail,
    `missing` makes a tool not found, `ram` is what is available, and a mounted store's
    whole size counts as promised RAM (an empty tmpfs)."""

    def __init__(self, tmp_path: Path, fail: str = "", missing: str = "", ram: int = 8 * GiB) -> None:
        super().__init__(tmp_path)
        self.fail_first, self.missing, self.ram = fail, missing, ram
        self.promised: dict[Path, int] = {}

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = " ".join(argv)
        if argv[0] == self.missing:
            self.commands.append(command)
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if self.fail_first and command.startswith(self.fail_first):
            self.commands.append(command)
            return subprocess.CompletedProcess(list(argv), 1, "", "boom")
        if argv[0] == "mount":
            self.promised[Path(argv[-1])] = int(argv[argv.index("-o") + 1].split(",")[0].removeprefix("size="))
        elif argv[0] == "umount":
            self.promised.pop(Path(argv[-1]), None)
        return super().run(argv)

    def system(self) -> System:
        return System(run=self.run, mem_available=lambda: self.ram, store_free=lambda p: self.promised.get(p, 0),
                      cow_dir=self.cow_dir, mounted=lambda p: p in self.mounts, sys_block=self.sys_block)  # fmt: skip

    def clean(self) -> bool:
        """No loop device, dm device, mount or store directory left."""
        return not (self.loops() or self.dms() or self.mounts or self.cow_dir.exists())


def file_disk(tmp_path: Path, name: str = "a.img") -> Disk:
    path = tmp_path / name
    path.write_bytes(b"\0" * MiB)
    return Disk(name=name, devnode=str(path), devnum=0, devtype="file", size=MiB, serial=name)


def block_disk(tmp_path: Path, name: str = "sdz", size: int = GiB) -> Disk:
    """A block device as far as the backing layer cares (it takes a shared lock on it)."""
    path = tmp_path / name
    path.write_bytes(b"\0" * 4096)
    return Disk(name=name, devnode=str(path), devnum=1, devtype="disk", size=size, serial=name)


def export(disk: Disk, mode: Mode, size: int = 16 * MiB) -> Export:
    return Export(disk, identity_for(BASE, disk), mode, size)


class Backing:
    """The backing layer alone, through the reconciler."""

    def __init__(self, machine: FakeMachine, journal: Path) -> None:
        self.machine = machine
        self.layer = BackingLayer(machine.system())
        self.reconciler = Reconciler(self.layer.drivers(), Journal(journal))

    def apply(self, *exports: Export) -> list[Failure]:
        return self.reconciler.apply([obj for e in exports for obj in self.layer.objects(e)[0]])


def backing(tmp_path: Path, fail: str = "", missing: str = "", ram: int = 8 * GiB) -> Backing:
    return Backing(FakeMachine(tmp_path, fail, missing, ram), tmp_path / "run" / "owned.jsonl")


SNAPSHOT_STEPS = ["losetup --find --show {src}", "modprobe dm_snapshot", "mount -t tmpfs",
                  "losetup --find --show {cow}", "dmsetup create"]  # fmt: skip


@pytest.mark.parametrize("step", SNAPSHOT_STEPS)
def test_snapshot_failing_at_any_step_leaves_nothing(tmp_path: Path, step: str) -> None:
    snap = export(file_disk(tmp_path), Mode.SNAPSHOT)
    store = tmp_path / "cow" / modes.dm_name_for(snap.nqn, Mode.SNAPSHOT)
    layer = backing(tmp_path, fail=step.format(src=snap.disk.devnode, cow=store / "store.cow"))
    failures = layer.apply(snap)
    assert len(failures) == 1 and failures[0].group == snap.nqn
    assert "snapshot mode: " in failures[0].message and failures[0].message.endswith("failed: boom")
    assert layer.machine.clean()  # no loop device, no store directory, no .cow file
    assert layer.reconciler.owned == {}


def test_snapshot_rollback_order(tmp_path: Path) -> None:
    snap = export(file_disk(tmp_path), Mode.SNAPSHOT)
    layer = backing(tmp_path, fail="dmsetup create")
    assert layer.apply(snap)
    store = layer.machine.cow_dir / modes.dm_name_for(snap.nqn, Mode.SNAPSHOT)
    undone = ["losetup --detach /dev/loop1", f"umount --lazy {store}", "losetup --detach /dev/loop0"]
    assert layer.machine.commands[-3:] == undone


@pytest.mark.parametrize(("mode", "tool", "package"), [(Mode.READ_ONLY, "dmsetup", "dmsetup"),
                                                       (Mode.SNAPSHOT, "dmsetup", "dmsetup"),
                                                       (Mode.READ_ONLY, "losetup", "mount"),
                                                       (Mode.SNAPSHOT, "mount", "mount"),
                                                       (Mode.SNAPSHOT, "modprobe", "kmod")])  # fmt: skip
def test_missing_tool_is_one_clear_error_and_nothing_leaks(tmp_path: Path, mode: Mode, tool: str,
                                                          package: str) -> None:  # fmt: skip
    layer = backing(tmp_path, missing=tool)
    wanted = export(file_disk(tmp_path), mode)
    (failure,) = layer.apply(wanted)
    assert failure.one_line() == (f"{wanted.nqn}: {mode.label} mode needs {tool} (package {package}), which is "
                                  f"not installed (install it, e.g. apt install {package})")  # fmt: skip
    assert layer.machine.clean() and layer.reconciler.owned == {}


def test_read_only_of_a_block_device_failing_makes_nothing(tmp_path: Path) -> None:
    layer = backing(tmp_path, fail="dmsetup create")
    ro = export(block_disk(tmp_path), Mode.READ_ONLY)
    (failure,) = layer.apply(ro)
    assert "read-only mode: dmsetup create" in failure.message and failure.message.endswith("failed: boom")
    name = modes.dm_name_for(ro.nqn, Mode.READ_ONLY)
    assert layer.machine.commands == ["modprobe dm_flakey", f"dmsetup create {name} --table 0 {GiB // 512} flakey "
                                                            f"{ro.disk.devnode} 0 0 1 1 error_writes"]  # fmt: skip
    assert layer.reconciler.owned == {}
    assert layer.reconciler.drivers["hold"].fds == {}  # type: ignore[attr-defined]  # the disk's lock let go


def test_snapshot_store_gets_its_own_tmpfs_and_teardown_removes_it(tmp_path: Path) -> None:
    layer = backing(tmp_path)
    snap = export(file_disk(tmp_path), Mode.SNAPSHOT)
    assert layer.apply(snap) == []
    name = modes.dm_name_for(snap.nqn, Mode.SNAPSHOT)
    store = layer.machine.cow_dir / name
    assert layer.machine.loops() == {"/dev/loop0": snap.disk.devnode, "/dev/loop1": str(store / "store.cow")}
    assert f"mount -t tmpfs -o size={16 * MiB},mode=0700,nosuid,nodev,noexec storagetm-cow {store}" in \
        layer.machine.commands
    assert [p.name for p in store.iterdir()] == ["store.cow"]  # on the store's own tmpfs, nothing else
    assert layer.reconciler.owned[("store", name)].facts == {"size": str(16 * MiB), "dir": str(store)}
    layer.machine.commands.clear()
    layer.reconciler.teardown()
    assert layer.machine.commands == [f"dmsetup remove {name}", "losetup --detach /dev/loop1",
                                      f"umount --lazy {store}", "losetup --detach /dev/loop0"]  # fmt: skip
    assert layer.machine.clean()


def test_store_refused_when_ram_cannot_hold_it(tmp_path: Path) -> None:
    layer = backing(tmp_path, ram=664 * MiB)  # 600 MiB once the 64 MiB reserve is kept
    (failure,) = layer.apply(export(block_disk(tmp_path), Mode.SNAPSHOT, GiB))
    assert failure.message.endswith(": snapshot store needs 1024 MiB of RAM, only 600 MiB free")
    assert failure.hint == "give storagetm.snapshot_size= (--snapshot-size) a smaller size, or export it read-only"
    assert layer.machine.commands == []  # refused before any store is mounted or device made
    assert layer.machine.clean() and layer.reconciler.owned == {}


def test_store_refused_for_a_file_leaves_its_loop_device_detached(tmp_path: Path) -> None:
    layer = backing(tmp_path, ram=664 * MiB)
    assert layer.apply(export(file_disk(tmp_path), Mode.SNAPSHOT, GiB))
    assert not any(c.startswith("mount") for c in layer.machine.commands)
    assert layer.machine.clean() and layer.reconciler.owned == {}


def test_ram_promised_to_other_stores_counts(tmp_path: Path) -> None:
    layer = backing(tmp_path, ram=2 * GiB)
    other = layer.machine.cow_dir / "storagetm-snapshot-other"
    other.mkdir(parents=True)
    layer.machine.promised[other] = GiB  # an existing store that may still grow by 1 GiB
    first = export(block_disk(tmp_path, "sdy"), Mode.SNAPSHOT, 512 * MiB)
    assert layer.apply(first) == []
    second = export(block_disk(tmp_path, "sdz"), Mode.SNAPSHOT, GiB)
    (failure,) = layer.apply(first, second)
    assert failure.group == second.nqn and "needs 1024 MiB of RAM, only 448 MiB free" in failure.message
    assert other.is_dir()  # not ours: left alone


def test_a_snapshot_that_does_not_fit_is_refused_and_the_rest_exported(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, ram=664 * MiB)
    target = Target(tmp_path, machine=machine)
    for name in ("snap", "ro"):
        (tmp_path / name).mkdir()
    snap = export(file_disk(tmp_path / "snap"), Mode.SNAPSHOT, GiB)
    ro = export(file_disk(tmp_path / "ro"), Mode.READ_ONLY)
    failures = target.apply(snap, ro)
    assert [f.one_line() for f in failures] == [f"{snap.nqn}: snapshot store needs 1024 MiB of RAM, only 600 MiB "
                                                "free (give storagetm.snapshot_size= (--snapshot-size) a smaller "
                                                "size, or export it read-only)"]  # fmt: skip
    assert target.names("subsystems") == sorted([ro.nqn, ANCHOR])
    assert target.names("ports", "4420", "subsystems") == sorted([ro.nqn, ANCHOR])
    namespace = target.fake.root / "subsystems" / ro.nqn / "namespaces" / "1"
    assert (namespace / "device_path").read_text().strip() == f"/dev/mapper/{modes.dm_name_for(ro.nqn, Mode.READ_ONLY)}"
    assert machine.dms() == {modes.dm_name_for(ro.nqn, Mode.READ_ONLY)} and not machine.mounts
    target.reconciler.teardown()
    assert machine.clean()


def test_a_store_of_no_size_asked_for_takes_what_ram_holds() -> None:
    """The default (1 GiB) is cut down to what RAM can hold, not refused: a laptop with 1 GiB
    of RAM still gets snapshot mode; a size asked for is refused instead."""
    def system(available: int) -> System:
        return System(mem_available=lambda: available, cow_dir=Path("/nonexistent"))

    assert store_size(system(4 << 30), 0) == DEFAULT_STORE_SIZE
    assert store_size(system(600 << 20), 0) == (600 << 20) - RAM_RESERVE
    with pytest.raises(BackingError, match="needs 16 MiB of RAM"):
        store_size(system(RAM_RESERVE + (8 << 20)), 0)
    with pytest.raises(BackingError, match="needs 1024 MiB of RAM"):
        store_size(system(600 << 20), 1 << 30)
    assert MIN_STORE_SIZE == 16 << 20


def test_teardown_goes_on_past_a_failing_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dm device that stays busy must not leave its loop devices and store behind, and
    stays in the ownership record: the next start removes it."""
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # remove_dm's retries while udev holds it
    layer = backing(tmp_path)
    snap = export(file_disk(tmp_path), Mode.SNAPSHOT)
    assert layer.apply(snap) == []
    store = layer.machine.cow_dir / modes.dm_name_for(snap.nqn, Mode.SNAPSHOT)
    layer.machine.fail_first, layer.machine.commands = "dmsetup remove", []
    layer.reconciler.teardown()
    assert layer.machine.commands[-3:] == ["losetup --detach /dev/loop1", f"umount --lazy {store}",
                                           "losetup --detach /dev/loop0"]  # fmt: skip
    assert list(layer.reconciler.owned) == [(DM, modes.dm_name_for(snap.nqn, Mode.SNAPSHOT))]
    assert layer.reconciler.journal.path.exists()
