"""The reconciler with both fabrics (nvmet, and iSCSI through LIO) and the backing layer,
end to end on the fake configfs trees and a fake machine: start, changes, crash adoption
at every record, teardown."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec.structs
import pytest

from storagetm.backing.layer import BackingLayer
from storagetm.backing.modes import Mode
from storagetm.desired import desired_state
from storagetm.disks.disk import Disk
from storagetm.disks.identity import identity_for
from storagetm.fabrics import Fabric
from storagetm.fabrics.lio import configfs as lio
from storagetm.fabrics.lio.fabric import IscsiFabric
from storagetm.fabrics.nvmet.configfs import Root
from storagetm.fabrics.nvmet.fabric import NvmetFabric, anchor_nqn
from storagetm.model import Export, IscsiConfig, Want
from storagetm.reconcile.journal import Journal
from storagetm.reconcile.objects import Obj
from storagetm.reconcile.reconciler import Reconciler
from storagetm.security.auth import AuthConfig, generate_secret
from storagetm.security.tls import TLSConfig, generate_key
from storagetm.system.network import Address
from tests.unit.fake_configfs import FakeConfigfs, FakeLio, discovery_ports
from tests.unit.fake_machine import FakeKeyring, FakeMachine

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
IQN_BASE = "iqn.2023-10.io.systemd.storagetm:0123456789ab"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
ADDRESS = Address("ipv4", "169.254.1.2", "enp0s3", True)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `finally` of the reconciler's."""


class World:
    """One machine: configfs, commands, keyring and the ownership record survive a crash;
    each `instance()` is a new storagetm process."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.fake = FakeConfigfs(tmp_path / "configfs")
        self.lio = FakeLio(tmp_path / "configfs")
        self.machine = FakeMachine(tmp_path)
        self.keyring = FakeKeyring()
        self.journal_path = tmp_path / "run" / "owned.jsonl"
        self.disks = [self._disk(f"disk{i}", block=i < 2) for i in range(4)]

    def _disk(self, name: str, block: bool) -> Disk:
        path = self.tmp / f"{name}.img"
        path.write_bytes(b"\0" * (1 << 20))
        return Disk(name=name, devnode=str(path), devnum=1 if block else 0, devtype="disk" if block else "file",
                    size=1 << 20, serial=name.upper())  # fmt: skip

    def instance(self, kill_at: int = 0) -> tuple[Reconciler, BackingLayer, list[Fabric]]:
        def fault(record: int, before: bool) -> None:
            if record == kill_at and before:
                raise Killed

        backing = BackingLayer(self.machine.system())
        fabrics: list[Fabric] = [NvmetFabric(Root(self.fake.root, self.fake), self.keyring),
                                 IscsiFabric(lio.Root(self.lio.root, self.lio))]  # fmt: skip
        journal = Journal(self.journal_path, fault=fault if kill_at else None)
        drivers = [driver for fabric in fabrics for driver in fabric.drivers()]
        return Reconciler([*backing.drivers(), *drivers], journal), backing, fabrics

    def want(self, modes: tuple[Mode, ...], port: int = 4420, auth: bool = False, tls: bool = False,
             iscsi: bool = False) -> Want:  # fmt: skip
        exports = {}
        for disk, mode in zip(self.disks, modes, strict=False):
            export = Export(disk, identity_for(BASE, disk), mode, 16 << 20)
            exports[export.nqn] = export
        chap = ("CHAPSECRET012345", "CHAPTARGET012345") if auth else ("", "")
        return Want(exports, BASE, port, False, AuthConfig(SECRET, "", (HOST,)) if auth else AuthConfig(),
                    TLSConfig(TLS_KEY, (HOST,)) if tls else TLSConfig(), (ADDRESS,),
                    iscsi=IscsiConfig(iscsi, IQN_BASE, *chap))  # fmt: skip

    def desired(self, want: Want) -> tuple[Obj, ...]:
        _, backing, fabrics = self.instance()
        return desired_state(want, backing, fabrics)

    def snapshot(self) -> tuple[list[str], list[str], list[str], list[str], list[str], list[str]]:
        """Everything the kernel holds: configfs paths of nvmet and LIO (with link targets),
        the files under loop devices, dm devices, mounts, keys."""
        return (self.fake.tree(), self.lio.tree(), sorted(self.machine.loops().values()), sorted(self.machine.dms()),
                sorted(str(m) for m in self.machine.mounts), sorted(self.keyring.keys))  # fmt: skip

    def empty(self) -> bool:
        tree, lio_tree, loops, dms, mounts, keys = self.snapshot()
        return (tree == ["hosts/", "ports/", "subsystems/"] and lio_tree == ["core/", "iscsi/"]
                and not (loops or dms or mounts or keys))  # fmt: skip


SECRET = generate_secret()
TLS_KEY = generate_key()
MIXED = (Mode.READ_WRITE, Mode.READ_ONLY, Mode.SNAPSHOT, Mode.READ_ONLY)  # two block disks, two files


def test_start_exports_every_disk_with_ports_anchor_and_referral(tmp_path: Path) -> None:
    world = World(tmp_path)
    reconciler, backing, fabrics = world.instance()
    want = world.want(MIXED)
    assert reconciler.apply(desired_state(want, backing, fabrics)) == []
    ports = world.fake.root / "ports"
    (discovery,) = discovery_ports(world.fake.root).values()
    assert sorted(os.listdir(ports)) == sorted(["4420", discovery.name])
    assert sorted(os.listdir(discovery / "subsystems")) == [anchor_nqn(BASE)]  # discovery only
    assert sorted(os.listdir(ports / "4420" / "subsystems")) == sorted([*want.exports, anchor_nqn(BASE)])
    referral = discovery / "referrals" / "storagetm"
    assert {a: (referral / f"addr_{a}").read_text().strip() for a in ("traddr", "trsvcid", "portid")} == {
        "traddr": "169.254.1.2", "trsvcid": "4420", "portid": "4420"}  # fmt: skip
    assert (referral / "enable").read_text().strip() == "1"
    assert (world.fake.root / "subsystems" / anchor_nqn(BASE) / "attr_allow_any_host").read_text().strip() == "0"
    assert len(world.machine.dms()) == 3 and len(world.machine.loops()) == 3  # 2 files under dm, 1 store
    reconciler.teardown()
    assert world.empty() and not world.journal_path.exists()


def test_restart_with_another_port_and_no_auth_leaves_nothing_of_the_old_settings(tmp_path: Path) -> None:
    """The issue's reproduction: port 4420 and an auth host, then port 5000 and no auth, then stop."""
    world = World(tmp_path)
    first, backing, fabrics = world.instance()
    assert first.apply(desired_state(world.want(MIXED, auth=True, tls=True, iscsi=True), backing, fabrics)) == []
    assert (world.fake.root / "hosts" / HOST).is_dir() and world.keyring.keys
    second, backing, fabrics = world.instance()  # a new process; the first was killed
    second.recover()
    want = world.want((Mode.SNAPSHOT, Mode.READ_WRITE, Mode.READ_WRITE), port=5000)
    assert second.apply(desired_state(want, backing, fabrics)) == []
    assert _relative(world.snapshot(), tmp_path) == fresh_snapshot(tmp_path / "fresh", want)
    assert not (world.fake.root / "ports" / "4420").exists() and not (world.fake.root / "hosts" / HOST).exists()
    assert world.keyring.keys == {}  # TLS keys revoked once TLS is off
    second.teardown()
    assert world.empty()


def fresh_snapshot(base: Path, want: Want) -> object:
    """What a storagetm that starts on a clean machine makes for `want`."""
    base.mkdir()
    clean = World(base)
    reconciler, backing, fabrics = clean.instance()
    remapped = Want({nqn: Export(_moved(e.disk, base), e.identity, e.mode, e.snapshot_size)
                     for nqn, e in want.exports.items()}, want.nqn_base, want.io_port, want.ipv6, want.auth,
                    want.tls, want.addresses, iscsi=want.iscsi)  # fmt: skip
    assert reconciler.apply(desired_state(remapped, backing, fabrics)) == []
    return _relative(clean.snapshot(), base)


def _moved(disk: Disk, base: Path) -> Disk:
    return msgspec.structs.replace(disk, devnode=str(base / Path(disk.devnode).name))


def _relative(snapshot: object, base: Path) -> object:
    return repr(snapshot).replace(str(base), "<tmp>")


def test_foreign_objects_are_never_touched(tmp_path: Path) -> None:
    world = World(tmp_path)
    foreign = world.fake.root / "subsystems" / "nqn.2024-01.com.example:theirs"
    world.fake.mkdir(str(foreign))
    world.fake.mkdir(str(world.fake.root / "ports" / "1"))
    reconciler, backing, fabrics = world.instance()
    assert reconciler.apply(desired_state(world.want(MIXED), backing, fabrics)) == []
    reconciler.teardown()
    assert foreign.is_dir() and (world.fake.root / "ports" / "1").is_dir()


def test_a_subsystem_another_program_made_fails_that_export_only(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED)
    taken = sorted(want.exports)[0]
    world.fake.mkdir(str(world.fake.root / "subsystems" / taken))
    reconciler, backing, fabrics = world.instance()
    failures = reconciler.apply(desired_state(want, backing, fabrics))
    assert [f.group for f in failures] == [taken]
    assert "made by another program" in failures[0].message
    assert sorted(os.listdir(world.fake.root / "ports" / "4420" / "subsystems")) == sorted(
        [*(set(want.exports) - {taken}), anchor_nqn(BASE)])  # fmt: skip
    reconciler.teardown()
    assert (world.fake.root / "subsystems" / taken).is_dir()  # still theirs
    assert not world.machine.loops() and not world.machine.dms()


def test_a_failing_command_undoes_its_export_and_nothing_else(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.machine.fail["dmsetup create"] = "device-mapper: reload ioctl failed"
    reconciler, backing, fabrics = world.instance()
    want = world.want((Mode.READ_WRITE, Mode.READ_ONLY))
    failures = reconciler.apply(desired_state(want, backing, fabrics))
    assert len(failures) == 1 and "reload ioctl failed" in failures[0].one_line()
    rw = next(nqn for nqn, e in want.exports.items() if e.mode is Mode.READ_WRITE)
    assert os.listdir(world.fake.root / "subsystems") == sorted([rw, anchor_nqn(BASE)]) or sorted(
        os.listdir(world.fake.root / "subsystems")) == sorted([rw, anchor_nqn(BASE)])  # fmt: skip
    assert not world.machine.dms()
    del world.machine.fail["dmsetup create"]
    assert reconciler.apply(desired_state(want, backing, fabrics)) == []  # the next pass makes it
    reconciler.teardown()
    assert world.empty()


def test_mode_change_remakes_the_backing_and_namespace_not_the_subsystem(tmp_path: Path) -> None:
    world = World(tmp_path)
    reconciler, backing, fabrics = world.instance()
    assert reconciler.apply(desired_state(world.want((Mode.READ_WRITE,)), backing, fabrics)) == []
    assert reconciler.apply(desired_state(world.want((Mode.SNAPSHOT,)), backing, fabrics)) == []
    assert [str(op) for op in reconciler.last_ops if op.action != "adopt"][:3] == [
        f"remove nvmet-port-link 4420 {sorted(world.want((Mode.SNAPSHOT,)).exports)[0]}",
        f"remove nvmet-namespace {sorted(world.want((Mode.SNAPSHOT,)).exports)[0]}",
        "create store " + next(k[1] for k in reconciler.owned if k[0] == "store")]  # fmt: skip
    assert reconciler.apply(desired_state(world.want((Mode.READ_WRITE,)), backing, fabrics)) == []
    assert not world.machine.mounts and not world.machine.loops()  # the snapshot's RAM store is gone
    reconciler.teardown()
    assert world.empty()


@pytest.mark.parametrize("iscsi", [False, True], ids=["nvmet", "nvmet+iscsi"])
def test_sigkill_at_every_record_then_restart_converges(tmp_path: Path, iscsi: bool) -> None:
    """Kill the process before a record of a start, a settings change and a teardown in turn;
    a new process recovers and converges on exactly what a clean start makes. With iSCSI,
    the change also turns CHAP off and changes modes: LIO's objects are remade."""
    base = tmp_path / "machine"  # the same paths each time: a file's NQN holds a hash of its path

    def fresh_world() -> World:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        return World(base)

    world = fresh_world()
    clean, backing, fabrics = world.instance()
    clean.apply(desired_state(world.want(MIXED[::-1], port=5000, iscsi=iscsi), backing, fabrics))
    expected = world.snapshot()
    world = fresh_world()
    ref, backing, fabrics = world.instance()
    ref.apply(desired_state(world.want(MIXED, auth=True, tls=True, iscsi=iscsi), backing, fabrics))
    ref.apply(desired_state(world.want(MIXED[::-1], port=5000, iscsi=iscsi), backing, fabrics))
    ref.teardown()
    records = ref.journal.records
    assert records > 60 and world.empty()
    # Every third record (a stride prime to the making/made pairs hits both halves of each),
    # and the last one: some 50 kills across start, change and teardown.
    for kill_at in [*range(1, records, 3), records]:
        world = fresh_world()
        process, backing, fabrics = world.instance(kill_at)
        with pytest.raises(Killed):
            process.apply(desired_state(world.want(MIXED, auth=True, tls=True, iscsi=iscsi), backing, fabrics))
            process.apply(desired_state(world.want(MIXED[::-1], port=5000, iscsi=iscsi), backing, fabrics))
            process.teardown()
        restarted, backing, fabrics = world.instance()
        restarted.recover()
        final = world.want(MIXED[::-1], port=5000, iscsi=iscsi)
        assert restarted.apply(desired_state(final, backing, fabrics)) == [], kill_at
        assert world.snapshot() == expected, kill_at
        restarted.teardown()
        assert world.empty(), kill_at
