"""The nvmet fabric through the reconciler, on the fake configfs: what an export makes,
how it is rolled back, withdrawn, resized and adopted, and what is never touched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgspec.structs
import pytest

from storagetm.backing.layer import BackingLayer
from storagetm.desired import desired_state
from storagetm.disks.disk import Disk
from storagetm.disks.identity import identity_for
from storagetm.errors import ConfigfsError
from storagetm.fabrics.nvmet.configfs import Root
from storagetm.fabrics.nvmet.fabric import NvmetFabric, anchor_nqn, port_ids
from storagetm.model import DISCOVERY_TRSVCID, Export, Listener, Want, wildcard
from storagetm.reconcile.journal import Journal
from storagetm.reconcile.reconciler import Failure, Reconciler
from storagetm.security.auth import AuthConfig
from storagetm.security.tls import Keyring, TLSConfig
from storagetm.system.network import Address
from tests.unit.fake_configfs import FakeConfigfs, discovery_ports
from tests.unit.fake_machine import FakeKeyring, FakeMachine

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
ANCHOR = anchor_nqn(BASE)
ADDRESS = Address("ipv4", "169.254.1.2", "enp0s3", True)


def file_disk(tmp_path: Path, name: str, size: int = 1 << 20) -> Disk:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return Disk(name=name, devnode=str(path), devnum=0, devtype="file", size=size, model="M", serial=name)


def export_of(disk: Disk) -> Export:
    return Export(disk, identity_for(BASE, disk))


class Target:
    """One machine (fake configfs, fake commands, fake keyring, the ownership record) and
    one storagetm process on it; `restart()` is a new process on the same machine."""

    def __init__(self, tmp_path: Path, *, machine: FakeMachine | None = None, keyring: Keyring | None = None,
                 fake: FakeConfigfs | None = None) -> None:  # fmt: skip
        self.fake = fake or FakeConfigfs(tmp_path / "configfs")
        self.machine = machine or FakeMachine(tmp_path)
        self.system = self.machine.system()
        self.keyring = keyring or FakeKeyring()
        self.journal_path = tmp_path / "run" / "owned.jsonl"
        self.root = Root(self.fake.root, self.fake)
        self.reconciler = self._process()

    def _process(self) -> Reconciler:
        self.backing = BackingLayer(self.system)
        self.fabric = NvmetFabric(self.root, self.keyring)
        return Reconciler([*self.backing.drivers(), *self.fabric.drivers()], Journal(self.journal_path))

    def restart(self) -> Reconciler:
        self.reconciler = self._process()
        self.reconciler.recover()
        return self.reconciler

    def want(self, *exports: Export, auth: AuthConfig | None = None, tls: TLSConfig | None = None,
             ipv6: bool = True, port: int = 4420, addresses: tuple[Address, ...] = ()) -> Want:  # fmt: skip
        return Want({e.nqn: e for e in exports}, BASE, port, ipv6, auth or AuthConfig(), tls or TLSConfig(),
                    addresses)  # fmt: skip

    def apply(self, *exports: Export, auth: AuthConfig | None = None, tls: TLSConfig | None = None,
              ipv6: bool = True, port: int = 4420, addresses: tuple[Address, ...] = ()) -> list[Failure]:  # fmt: skip
        want = self.want(*exports, auth=auth, tls=tls, ipv6=ipv6, port=port, addresses=addresses)
        return self.reconciler.apply(desired_state(want, self.backing, [self.fabric]))

    def names(self, *parts: str) -> list[str]:
        return sorted(os.listdir(self.fake.root.joinpath(*parts)))


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target(tmp_path)


def test_export_sets_identity_and_links_the_io_port_only(tmp_path: Path, target: Target) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, addresses=(ADDRESS,)) == []
    sub = target.fake.root / "subsystems" / export.nqn
    assert (sub / "attr_allow_any_host").read_text().strip() == "1"
    assert (sub / "attr_serial").read_text().strip() == "a"
    ns = sub / "namespaces" / "1"
    assert (ns / "device_path").read_text().strip() == export.disk.devnode
    assert (ns / "enable").read_text().strip() == "1"
    assert (ns / "device_uuid").read_text().strip() == export.identity.uuid
    # nvmet's discovery log gives each entry the port it was asked on: linked into 8009,
    # a subsystem would do its I/O there. 8009 holds only the anchor nobody may use.
    assert target.names("ports", "4420", "subsystems") == sorted([export.nqn, ANCHOR])
    assert (target.fake.root / "ports" / "4420" / "addr_traddr").read_text().strip() == "::"
    (discovery,) = discovery_ports(target.fake.root).values()
    assert sorted(os.listdir(discovery / "subsystems")) == [ANCHOR]
    assert (discovery / "addr_traddr").read_text().strip() == "169.254.1.2"
    assert (target.fake.root / "subsystems" / ANCHOR / "attr_allow_any_host").read_text().strip() == "0"
    assert target.names("subsystems", ANCHOR, "namespaces") == []


def referral_of(port: Path) -> dict[str, str]:
    assert sorted(os.listdir(port / "referrals")) == ["storagetm"]  # one per port: more would be multipath
    referral = port / "referrals" / "storagetm"
    assert (referral / "enable").read_text().strip() == "1"
    return {a: (referral / f"addr_{a}").read_text().strip() for a in ("adrfam", "traddr", "trsvcid", "portid")}


def test_each_address_has_a_discovery_port_that_refers_to_that_address(target: Target) -> None:
    """An initiator that reached the target at one address is referred to that address: a
    target with two networks (a network boot's and the cable's) or an initiator without
    link-local IPv4 is referred to an address it can reach."""
    second = Address("ipv4", "192.0.2.7", "enp0s4", False)
    v6 = Address("ipv6", "fe80::1", "enp0s3", True)
    assert target.apply(port=5000, addresses=(ADDRESS, second, v6)) == []
    ports = discovery_ports(target.fake.root)
    assert sorted(ports) == ["169.254.1.2", "192.0.2.7", "fe80::1%enp0s3"]  # bound with its zone
    assert referral_of(ports["169.254.1.2"]) == {"adrfam": "ipv4", "traddr": "169.254.1.2", "trsvcid": "5000",
                                                 "portid": "5000"}  # fmt: skip
    assert referral_of(ports["192.0.2.7"])["traddr"] == "192.0.2.7"
    assert referral_of(ports["fe80::1%enp0s3"]) == {"adrfam": "ipv6", "traddr": "fe80::1", "trsvcid": "5000",
                                                    "portid": "5000"}  # an entry carries no zone  # fmt: skip
    kept = ports["192.0.2.7"].name
    target.fake.writes.clear()
    assert target.apply(port=5000, addresses=(second,)) == []  # two addresses went: their ports follow
    assert list(discovery_ports(target.fake.root)) == ["192.0.2.7"]
    assert discovery_ports(target.fake.root)["192.0.2.7"].name == kept  # untouched
    assert not [w for w in target.fake.writes if f"ports/{kept}/" in w[0]]
    assert target.apply(port=5000) == []  # no address at all: no discovery port
    assert target.names("ports") == ["5000"]


def test_port_ids_are_stable_and_apart() -> None:
    listeners = [Listener("ipv4", f"10.0.0.{i}", 8009) for i in range(200)]
    ids = port_ids(listeners, 4420)
    assert len(set(ids)) == 200 and "4420" not in ids and all(10000 <= int(i) < 60000 for i in ids)
    assert port_ids(listeners[5:6], 4420) == port_ids(listeners[5:6], 4420)


def test_port_ids_do_not_depend_on_the_order_of_colliding_listeners() -> None:
    by_id: dict[int, list[Listener]] = {}
    for i in range(5000):  # two addresses whose ids collide
        listener = Listener("ipv4", f"10.{i >> 8}.{i & 255}.1", 8009)
        by_id.setdefault(int(port_ids([listener], 4420)[0]), []).append(listener)
    first, second = next(pair for pair in by_id.values() if len(pair) > 1)[:2]
    forward = port_ids([first, second], 4420)
    assert forward[0] != forward[1]
    assert port_ids([second, first], 4420) == forward[::-1]


def test_io_port_8009_is_one_port_without_a_referral(tmp_path: Path, target: Target) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, port=DISCOVERY_TRSVCID, addresses=(ADDRESS,)) == []
    assert target.names("ports") == ["8009"]
    assert target.names("ports", "8009", "subsystems") == sorted([export.nqn, ANCHOR])
    assert target.names("ports", "8009", "referrals") == []


class OrderedConfigfs(FakeConfigfs):
    """Records whether a subsystem's namespace was enabled when it was linked into a port."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.enabled_when_linked: dict[str, bool] = {}

    def symlink(self, target_name: str, link_name: str) -> None:
        if "/ports/" in link_name:
            enable = Path(target_name) / "namespaces" / "1" / "enable"
            self.enabled_when_linked[Path(link_name).name] = enable.is_file() and enable.read_text().strip() == "1"
        super().symlink(target_name, link_name)


def test_subsystem_is_linked_last_and_linking_twice_is_harmless(tmp_path: Path) -> None:
    """An initiator watching the discovery log connects as soon as the link is made: the
    namespace must be enabled by then."""
    target = Target(tmp_path, fake=OrderedConfigfs(tmp_path / "configfs"))
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export) == []
    assert target.fake.links[-1] == f"ports/4420/subsystems/{export.nqn}"
    assert [link for link in target.fake.links if link.endswith(export.nqn)] == [f"ports/4420/subsystems/{export.nqn}"]
    assert isinstance(target.fake, OrderedConfigfs) and target.fake.enabled_when_linked[export.nqn]
    count = len(target.fake.links)
    target.root.port(4420).link(target.root.subsystem(export.nqn))  # as a retry may
    assert len(target.fake.links) == count


def test_half_made_export_is_rolled_back(tmp_path: Path, target: Target) -> None:
    target.fake.fail_on["enable"] = errno.EINVAL
    export = export_of(file_disk(tmp_path, "a"))
    failures = target.apply(export)
    assert len(failures) == 1 and failures[0].group == export.nqn and "Invalid argument" in failures[0].message
    assert target.names("subsystems") == [ANCHOR]
    assert target.names("ports", "4420", "subsystems") == [ANCHOR]
    assert not any(owned.group == export.nqn for owned in target.reconciler.owned.values())
    del target.fake.fail_on["enable"]
    assert target.apply(export) == []  # the next pass makes it whole
    assert target.names("ports", "4420", "subsystems") == sorted([export.nqn, ANCHOR])


def test_withdraw_leaves_other_exports_and_foreign_objects(tmp_path: Path, target: Target) -> None:
    foreign = target.root.create_subsystem("nqn.2014-08.org.example:not-ours")
    target.root.create_port(1)
    a, b = export_of(file_disk(tmp_path, "a")), export_of(file_disk(tmp_path, "b"))
    assert target.apply(a, b) == []
    assert target.apply(b) == []
    assert target.names("subsystems") == sorted([b.nqn, foreign.name, ANCHOR])
    assert target.names("ports", "4420", "subsystems") == sorted([b.nqn, ANCHOR])
    target.reconciler.teardown()
    assert target.names("subsystems") == [foreign.name]
    assert target.names("ports") == ["1"]
    assert not target.journal_path.exists()


def test_size_change_revalidates_in_place(tmp_path: Path, target: Target) -> None:
    disk = file_disk(tmp_path, "a")
    export = export_of(disk)
    assert target.apply(export) == []
    bigger = Export(msgspec.structs.replace(disk, size=disk.size * 2), export.identity)
    target.fake.links.clear()
    assert target.apply(bigger) == []
    assert (f"subsystems/{export.nqn}/namespaces/1/revalidate_size", "1") in target.fake.writes
    assert [str(op) for op in target.reconciler.last_ops] == [f"update nvmet-namespace {export.nqn} (size)"]
    assert target.fake.links == []  # not remade: connected initiators stay connected


def test_adopt_takes_over_without_rewriting(tmp_path: Path, target: Target) -> None:
    """A restarted storagetm finds what the killed one made in the ownership record and
    keeps it: nothing is written, linked or removed."""
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, addresses=(ADDRESS,)) == []
    target.fake.writes.clear()
    target.fake.links.clear()
    successor = target.restart()
    assert target.apply(export, addresses=(ADDRESS,)) == []
    assert target.fake.writes == [] and target.fake.links == []
    assert {op.action for op in successor.last_ops} == {"adopt"}
    assert target.names("ports") == sorted(["4420", discovery_ports(target.fake.root)["169.254.1.2"].name])
    assert target.names("ports", "4420", "subsystems") == sorted([export.nqn, ANCHOR])
    successor.teardown()
    assert target.names("subsystems") == [] and target.names("ports") == []


def test_a_settings_change_after_a_restart_removes_what_the_old_settings_made(tmp_path: Path,
                                                                              target: Target) -> None:  # fmt: skip
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export) == []
    target.restart()
    assert target.apply(export, port=5000) == []
    assert target.names("ports") == ["5000"]  # no address: no discovery port
    assert target.names("ports", "5000", "subsystems") == sorted([export.nqn, ANCHOR])


def test_enabled_port_refuses_attribute_writes(tmp_path: Path, target: Target) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export) == []
    with pytest.raises(ConfigfsError, match="Permission denied"):
        target.root.port(4420).set("addr", "trsvcid", "4421")


def test_rmdir_of_subsystem_with_namespace_fails_like_the_kernel(target: Target) -> None:
    sub = target.root.create_subsystem("nqn.2014-08.org.example:x")
    sub.create_namespace(1)
    with pytest.raises(ConfigfsError, match="not empty"):
        sub._rmdir()
    sub.delete()
    assert not sub.exists()


def test_ipv4_only_fallback(target: Target) -> None:
    assert {(lst.adrfam, lst.traddr) for lst in target.want(ipv6=False).listeners} == {("ipv4", "0.0.0.0")}
    assert {(lst.adrfam, lst.traddr) for lst in target.want().listeners} == {("ipv6", "::")}  # dual-stack
    assert wildcard(False, 4420).trsvcid == 4420
    assert target.apply(ipv6=False, addresses=(ADDRESS, Address("ipv6", "fe80::1", "enp0s3", True))) == []
    assert (target.fake.root / "ports" / "4420" / "addr_traddr").read_text().strip() == "0.0.0.0"
    assert list(discovery_ports(target.fake.root)) == ["169.254.1.2"]  # no IPv6 port without IPv6
