from __future__ import annotations

import errno
from pathlib import Path

import pytest

from storagetm.configfs import Root
from storagetm.disks import Disk
from storagetm.errors import ConfigfsError
from storagetm.identity import identity_for
from storagetm.model import Export, Exporter, listeners
from tests.unit.fake_configfs import FakeConfigfs

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"


def file_disk(tmp_path: Path, name: str, size: int = 1 << 20) -> Disk:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return Disk(name=name, devnode=str(path), devnum=0, devtype="file", size=size, model="M", serial=name)


@pytest.fixture
def fake(tmp_path: Path) -> FakeConfigfs:
    return FakeConfigfs(tmp_path / "configfs")


@pytest.fixture
def exporter(fake: FakeConfigfs) -> Exporter:
    exp = Exporter(Root(fake.root, fake))
    exp.open_ports(listeners(4420, ipv6=True))
    return exp


def export_of(disk: Disk) -> Export:
    return Export(disk, identity_for(BASE, disk))


def test_export_sets_identity_and_links_both_ports(tmp_path: Path, fake: FakeConfigfs, exporter: Exporter) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    assert exporter.apply({export.nqn: export}) == []
    sub = fake.root / "subsystems" / export.nqn
    assert (sub / "attr_allow_any_host").read_text().strip() == "1"
    assert (sub / "attr_serial").read_text().strip() == "a"
    ns = sub / "namespaces" / "1"
    assert (ns / "device_path").read_text().strip() == export.disk.devnode
    assert (ns / "enable").read_text().strip() == "1"
    assert (ns / "device_uuid").read_text().strip() == export.identity.uuid
    for port in ("4420", "8009"):
        assert (fake.root / "ports" / port / "subsystems" / export.nqn).is_symlink()
        assert (fake.root / "ports" / port / "addr_traddr").read_text().strip() == "::"


def test_discovery_port_linked_first_and_linking_twice_is_harmless(
    tmp_path: Path, fake: FakeConfigfs, exporter: Exporter
) -> None:
    """An initiator told by the discovery port's log-change event connects right away."""
    export = export_of(file_disk(tmp_path, "a"))
    assert exporter.apply({export.nqn: export}) == []
    assert fake.links == [f"ports/8009/subsystems/{export.nqn}", f"ports/4420/subsystems/{export.nqn}"]
    exporter.root.port(4420).link(exporter.root.subsystem(export.nqn))  # as adoption may
    assert len(fake.links) == 2


def test_half_made_export_is_rolled_back(tmp_path: Path, fake: FakeConfigfs, exporter: Exporter) -> None:
    fake.fail_on["enable"] = errno.EINVAL
    export = export_of(file_disk(tmp_path, "a"))
    errors = exporter.apply({export.nqn: export})
    assert len(errors) == 1 and "Invalid argument" in errors[0].message
    assert list((fake.root / "subsystems").iterdir()) == []
    assert list((fake.root / "ports" / "4420" / "subsystems").iterdir()) == []
    assert exporter.exports == {}


def test_withdraw_leaves_other_exports_and_foreign_objects(tmp_path: Path, fake: FakeConfigfs,
                                                           exporter: Exporter) -> None:  # fmt: skip
    foreign = Root(fake.root, fake).create_subsystem("nqn.2014-08.org.example:not-ours")
    a, b = export_of(file_disk(tmp_path, "a")), export_of(file_disk(tmp_path, "b"))
    exporter.apply({a.nqn: a, b.nqn: b})
    exporter.apply({b.nqn: b})
    names = sorted(p.name for p in (fake.root / "subsystems").iterdir())
    assert names == sorted([b.nqn, foreign.name])
    exporter.teardown()
    assert [p.name for p in (fake.root / "subsystems").iterdir()] == [foreign.name]
    assert list((fake.root / "ports").iterdir()) == []


def test_size_change_revalidates(tmp_path: Path, fake: FakeConfigfs, exporter: Exporter) -> None:
    disk = file_disk(tmp_path, "a")
    export = export_of(disk)
    exporter.apply({export.nqn: export})
    bigger = Export(Disk(**{**disk.__dict__, "size": disk.size * 2}), export.identity)
    exporter.apply({export.nqn: bigger})
    assert (f"subsystems/{export.nqn}/namespaces/1/revalidate_size", "1") in fake.writes


def test_adopt_takes_over_without_rewriting(tmp_path: Path, fake: FakeConfigfs, exporter: Exporter) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    exporter.apply({export.nqn: export})
    ports = dict(exporter.owned_ports)
    fake.writes.clear()
    successor = Exporter(Root(fake.root, fake))
    successor.open_ports(listeners(4420, ipv6=True), adopt=ports)
    successor.adopt({export.nqn: export})
    assert successor.apply({export.nqn: export}) == []
    assert fake.writes == []
    assert sorted(p.name for p in (fake.root / "ports").iterdir()) == ["4420", "8009"]


def test_enabled_port_refuses_attribute_writes(tmp_path: Path, fake: FakeConfigfs, exporter: Exporter) -> None:
    export = export_of(file_disk(tmp_path, "a"))
    exporter.apply({export.nqn: export})
    with pytest.raises(ConfigfsError, match="Permission denied"):
        Root(fake.root, fake).port(4420).set("addr", "trsvcid", "4421")


def test_rmdir_of_subsystem_with_namespace_fails_like_the_kernel(fake: FakeConfigfs) -> None:
    root = Root(fake.root, fake)
    sub = root.create_subsystem("nqn.2014-08.org.example:x")
    sub.create_namespace(1)
    with pytest.raises(ConfigfsError, match="not empty"):
        sub._rmdir()
    sub.delete()
    assert not sub.exists()


def test_ipv4_only_fallback() -> None:
    assert {(lst.adrfam, lst.traddr) for lst in listeners(4420, ipv6=False)} == {("ipv4", "0.0.0.0")}
