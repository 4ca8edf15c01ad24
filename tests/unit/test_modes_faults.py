"""Snapshot and read-only backings when the machine says no: a missing or failing tool
at any step, or too little RAM for a store. Nothing made before the failure stays."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from storagetm import modes
from storagetm.configfs import Root
from storagetm.disks import Disk
from storagetm.identity import identity_for
from storagetm.model import Export, Exporter, listeners
from storagetm.modes import DEFAULT_STORE_SIZE, MIN_STORE_SIZE, RAM_RESERVE, BackingError, Mode, System, store_size
from tests.unit.fake_configfs import FakeConfigfs

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
NQN = f"{BASE}.file-a-img-0123abcd"
GiB, MiB = 1 << 30, 1 << 20


class FakeMachine:
    """Records every command; `fail` makes the first command starting with it fail,
    `missing` makes a tool not found. Loop devices are numbered as losetup would."""

    def __init__(self, tmp_path: Path, fail: str = "", missing: str = "", ram: int = 8 * GiB) -> None:
        self.cow_dir = tmp_path / "cow"
        self.fail, self.missing, self.ram = fail, missing, ram
        self.calls: list[str] = []
        self.promised: dict[Path, int] = {}
        self.loops = 0
        self.mounts: list[str] = []

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = " ".join(argv)
        self.calls.append(command)
        if argv[0] == self.missing:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if self.fail and command.startswith(self.fail):
            return subprocess.CompletedProcess(argv, 1, "", "boom")
        out = ""
        if tuple(argv[:3]) == ("losetup", "--find", "--show"):
            out, self.loops = f"/dev/loop{self.loops}\n", self.loops + 1
        if argv[0] == "mount":  # an empty tmpfs: all of its size is promised RAM
            self.mounts.append(argv[-1])
            self.promised[Path(argv[-1])] = int(argv[argv.index("-o") + 1].split(",")[0].removeprefix("size="))
        return subprocess.CompletedProcess(argv, 0, out, "")

    def system(self) -> System:
        return System(run=self.run, mem_available=lambda: self.ram,
                      store_free=lambda p: self.promised.get(p, 0), cow_dir=self.cow_dir)  # fmt: skip

    def made_and_unmade(self) -> tuple[set[str], set[str]]:
        """Loop devices and mounts made, and those detached or unmounted."""
        made = {f"/dev/loop{n}" for n in range(self.loops)} | set(self.mounts)
        unmade = {c.split()[-1] for c in self.calls if c.startswith(("losetup --detach", "umount --lazy"))}
        return made, unmade


def image(tmp_path: Path) -> str:
    path = tmp_path / "a.img"
    path.write_bytes(b"\0" * MiB)
    return str(path)


SNAPSHOT_STEPS = ["losetup --find --show {src}", "modprobe dm_snapshot", "mount -t tmpfs",
                  "losetup --find --show {cow}", "dmsetup create"]  # fmt: skip


@pytest.mark.parametrize("step", SNAPSHOT_STEPS)
def test_snapshot_failing_at_any_step_leaves_nothing(tmp_path: Path, step: str) -> None:
    src = image(tmp_path)
    store = tmp_path / "cow" / modes.dm_name_for(NQN, Mode.SNAPSHOT)
    machine = FakeMachine(tmp_path, fail=step.format(src=src, cow=store / "store.cow"))
    with pytest.raises(BackingError, match="snapshot mode: .* failed: boom"):
        modes.prepare(src, MiB, Mode.SNAPSHOT, NQN, 16 * MiB, machine.system())
    made, unmade = machine.made_and_unmade()
    assert made == unmade
    assert not machine.cow_dir.exists()  # no store directory, no .cow file


def test_snapshot_rollback_order(tmp_path: Path) -> None:
    src = image(tmp_path)
    machine = FakeMachine(tmp_path, fail="dmsetup create")
    with pytest.raises(BackingError):
        modes.prepare(src, MiB, Mode.SNAPSHOT, NQN, 16 * MiB, machine.system())
    store = machine.cow_dir / modes.dm_name_for(NQN, Mode.SNAPSHOT)
    undone = ["losetup --detach /dev/loop1", f"umount --lazy {store}", "losetup --detach /dev/loop0"]
    assert machine.calls[-3:] == undone


@pytest.mark.parametrize(("mode", "tool", "package"), [(Mode.READ_ONLY, "dmsetup", "dmsetup"),
                                                       (Mode.SNAPSHOT, "dmsetup", "dmsetup"),
                                                       (Mode.READ_ONLY, "losetup", "mount"),
                                                       (Mode.SNAPSHOT, "mount", "mount"),
                                                       (Mode.SNAPSHOT, "modprobe", "kmod")])  # fmt: skip
def test_missing_tool_is_one_clear_error_and_nothing_leaks(tmp_path: Path, mode: Mode, tool: str,
                                                          package: str) -> None:  # fmt: skip
    machine = FakeMachine(tmp_path, missing=tool)
    with pytest.raises(BackingError) as raised:
        modes.prepare(image(tmp_path), MiB, mode, NQN, 16 * MiB, machine.system())
    assert raised.value.one_line() == (f"{mode.label} mode needs {tool} (package {package}), which is not "
                                       f"installed (install it, e.g. apt install {package})")  # fmt: skip
    made, unmade = machine.made_and_unmade()
    assert made == unmade and not machine.cow_dir.exists()


def test_read_only_of_a_block_device_failing_makes_nothing(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, fail="dmsetup create")
    with pytest.raises(BackingError, match="read-only mode: dmsetup create .* failed: boom"):
        modes.prepare("/dev/sdz", GiB, Mode.READ_ONLY, NQN, 16 * MiB, machine.system())
    assert machine.calls == ["modprobe dm_flakey", f"dmsetup create {modes.dm_name_for(NQN, Mode.READ_ONLY)} "
                             f"--table 0 {GiB // 512} flakey /dev/sdz 0 0 1 1 error_writes"]  # fmt: skip


def test_snapshot_store_gets_its_own_tmpfs_and_release_removes_it(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path)
    backing = modes.prepare(image(tmp_path), MiB, Mode.SNAPSHOT, NQN, 16 * MiB, machine.system())
    store = machine.cow_dir / modes.dm_name_for(NQN, Mode.SNAPSHOT)
    assert backing.store == str(store) and backing.cow == "/dev/loop1" and backing.loop == "/dev/loop0"
    assert f"mount -t tmpfs -o size={16 * MiB},mode=0700,nosuid,nodev,noexec storagetm-cow {store}" in machine.calls
    assert list(store.iterdir()) == []  # the .cow file is unlinked once the loop device holds it
    machine.calls.clear()
    modes.release(backing, machine.system())
    assert machine.calls == [f"dmsetup remove {backing.dm_name}", "losetup --detach /dev/loop1",
                             f"umount --lazy {store}", "losetup --detach /dev/loop0"]  # fmt: skip
    assert not machine.cow_dir.exists()


def test_store_refused_when_ram_cannot_hold_it(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, ram=664 * MiB)  # 600 MiB once the 64 MiB reserve is kept
    with pytest.raises(BackingError) as raised:
        modes.prepare(image(tmp_path), MiB, Mode.SNAPSHOT, NQN, GiB, machine.system())
    assert raised.value.one_line() == ("snapshot store needs 1024 MiB of RAM, only 600 MiB free (give "
                                       "storagetm.snapshot_size= (--snapshot-size) a smaller size, or export it "
                                       "read-only)")  # fmt: skip
    assert machine.calls == []  # refused before anything is made


def test_ram_promised_to_other_stores_counts(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, ram=2 * GiB)
    other = machine.cow_dir / "storagetm-snapshot-other"
    other.mkdir(parents=True)
    machine.promised[other] = GiB  # an existing store that may still grow by 1 GiB
    modes.prepare(image(tmp_path), MiB, Mode.SNAPSHOT, NQN, 512 * MiB, machine.system())
    with pytest.raises(BackingError, match="needs 1024 MiB of RAM, only 448 MiB free"):
        modes.prepare(image(tmp_path), MiB, Mode.SNAPSHOT, BASE + ".second", GiB, machine.system())


def test_exporter_refuses_a_snapshot_that_does_not_fit_and_exports_the_rest(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    machine = FakeMachine(tmp_path, ram=664 * MiB)
    exporter = Exporter(Root(fake.root, fake), system=machine.system())
    exporter.open_ports(listeners(4420, ipv6=True))
    for name in ("snap", "ro"):
        (tmp_path / name).mkdir()
    disks = [Disk(name=n, devnode=image(tmp_path / n), devnum=0, devtype="file", size=MiB, serial=n)
             for n in ("snap", "ro")]  # fmt: skip
    snap = Export(disks[0], identity_for(BASE, disks[0]), Mode.SNAPSHOT, GiB)
    ro = Export(disks[1], identity_for(BASE, disks[1]), Mode.READ_ONLY)
    errors = exporter.apply({snap.nqn: snap, ro.nqn: ro})
    assert [e.one_line() for e in errors] == [f"{disks[0].devnode}: snapshot store needs 1024 MiB of RAM, only "
                                              "600 MiB free (give storagetm.snapshot_size= (--snapshot-size) a "
                                              "smaller size, or export it read-only)"]  # fmt: skip
    assert list(exporter.exports) == [ro.nqn]
    assert [p.name for p in (fake.root / "subsystems").iterdir()] == [ro.nqn]


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


def test_release_goes_on_past_a_failing_step(tmp_path: Path) -> None:
    """A dm device that stays busy must not leave its loop devices and store behind."""
    machine = FakeMachine(tmp_path)
    backing = modes.prepare(image(tmp_path), MiB, Mode.SNAPSHOT, NQN, 16 * MiB, machine.system())
    machine.fail, machine.calls = "dmsetup remove", []
    with pytest.raises(BackingError, match="cannot remove"):
        modes.release(backing, machine.system())
    assert machine.calls[-3:] == ["losetup --detach /dev/loop1", f"umount --lazy {backing.store}",
                                  "losetup --detach /dev/loop0"]  # fmt: skip
