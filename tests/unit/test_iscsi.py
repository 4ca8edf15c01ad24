"""The iSCSI fabric (LIO): its objects for each mode and protection, the names (IQN, INQUIRY,
unit serial), and what it leaves in a kernel-like LIO tree on start, change and teardown."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec.structs
import pytest
from msgspec.structs import replace

from storagetm.backing.modes import Mode
from storagetm.console.screen import iscsi_lines, render
from storagetm.desired import desired_state
from storagetm.disks.identity import IQN_MAX, iqn_base, target_iqn
from storagetm.fabrics.lio import configfs as lio
from storagetm.fabrics.lio.fabric import BACKSTORE, ENABLE, PORTAL, TPG, inquiry_names
from storagetm.model import IscsiConfig
from storagetm.reconcile.objects import Obj
from storagetm.security.auth import AuthConfig, generate_secret
from storagetm.security.chap import ALPHABET, SECRET_LENGTH, chap_secrets, derive_secret
from storagetm.security.tls import TLSConfig, generate_key
from storagetm.state import RunState
from storagetm.system.network import Address
from tests.unit.fake_configfs import FakeConfigfs, FakeLio
from tests.unit.test_reconciler import IQN_BASE, MIXED, World

# RFC 3720 3.2.6.3.1, as LIO and Windows take it: lower case, no spaces.
IQN_RE = re.compile(r"^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*:[a-z0-9.:-]+$")


def by_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj.kind == kind]


def test_each_disk_is_one_target_with_a_stable_valid_iqn(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED, iscsi=True)
    objs = world.desired(want)
    enables = by_kind(objs, ENABLE)
    assert len(enables) == len(want.exports) == 4
    for obj in enables:
        assert IQN_RE.fullmatch(obj.name) and len(obj.name.encode()) <= IQN_MAX, obj.name
    assert {obj.name for obj in enables} == {target_iqn(IQN_BASE, e.disk) for e in want.exports.values()}
    assert world.desired(want) == objs  # pure: the same Want, the same objects
    assert iqn_base("0123456789ab") == IQN_BASE


def test_a_long_identity_still_fits_an_iqn(tmp_path: Path) -> None:
    disk = World(tmp_path).disks[0]
    long = msgspec.structs.replace(disk, model="m" * 200, serial="s" * 200)
    iqn = target_iqn(IQN_BASE, long)
    assert IQN_RE.fullmatch(iqn) and len(iqn.encode()) <= IQN_MAX


def test_backstores_follow_the_device_the_backing_layer_makes(tmp_path: Path) -> None:
    """A file exported read-write as it is goes through fileio; every other export through
    iblock on the device the backing layer made (dm for read-only and snapshot)."""
    world = World(tmp_path)
    want = world.want(MIXED, iscsi=True)  # rw block, ro block, snapshot file, ro file
    stores = {obj.group: obj for obj in by_kind(world.desired(want), BACKSTORE)}
    for nqn, export in want.exports.items():
        store = stores[nqn]
        if export.mode is Mode.READ_WRITE:
            assert store.attr("device") == export.disk.devnode
        else:
            assert store.attr("device").startswith("/dev/mapper/storagetm-")
            assert ("dm", store.attr("device").rpartition("/")[2]) in store.needs
        assert store.name.startswith("fileio_" if export.disk.is_file and export.mode is Mode.READ_WRITE
                                     else "iblock_")  # fmt: skip
    want = world.want((Mode.READ_WRITE,) * 4, iscsi=True)
    rw_file = next(e for e in want.exports.values() if e.disk.is_file)
    assert {o.group: o for o in by_kind(world.desired(want), BACKSTORE)}[rw_file.nqn].name.startswith("fileio_")


def test_read_only_is_write_protected_by_the_portal_group_too(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED, iscsi=True)
    tpgs = {obj.group: obj for obj in by_kind(world.desired(want), TPG)}
    for nqn, export in want.exports.items():
        assert tpgs[nqn].attr("write_protect") == ("1" if export.mode is Mode.READ_ONLY else "0")


def test_without_protection_anyone_logs_in_with_it_only_with_chap(tmp_path: Path) -> None:
    world = World(tmp_path)
    open_tpg = by_kind(world.desired(world.want(MIXED, iscsi=True)), TPG)[0]
    assert open_tpg.attr("authentication") == "0" and not open_tpg.attr("password")
    tpg = by_kind(world.desired(world.want(MIXED, auth=True, iscsi=True)), TPG)[0]
    assert tpg.attr("authentication") == "1"
    assert (tpg.attr("userid"), tpg.attr("password")) == ("storagetm", "CHAPSECRET012345")
    assert tpg.attr("password_mutual") == "CHAPTARGET012345"
    assert "CHAPSECRET012345" not in str(tpg.recorded_attrs)  # the record keeps digests only


def test_chap_secrets_fit_windows_and_follow_nvme_protection() -> None:
    secret, ctrl = generate_secret(), generate_secret()
    initiator, target = chap_secrets(AuthConfig(secret, ctrl, ("nqn.2014-08.org.nvmexpress:uuid:x",)), TLSConfig())
    assert len(initiator) == len(target) == SECRET_LENGTH and initiator != target
    assert set(initiator + target) <= set(ALPHABET)
    assert chap_secrets(AuthConfig(secret, ctrl, ("h",)), TLSConfig())[0] == initiator  # a restart keeps it
    assert chap_secrets(AuthConfig(secret, "", ("h",)), TLSConfig()) == (initiator, "")
    key = generate_key()
    assert chap_secrets(AuthConfig(), TLSConfig(key, ("h",))) == (derive_secret(key, "initiator"), "")
    assert chap_secrets(AuthConfig(), TLSConfig()) == ("", "")


def test_disabled_or_refused_offers_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)
    assert not [o for o in world.desired(world.want(MIXED)) if o.kind.startswith(("iscsi", "lio"))]
    want = world.want(MIXED, iscsi=True)
    refused = msgspec.structs.replace(want, listen=False)
    assert not [o for o in world.desired(refused) if o.kind.startswith(("iscsi", "lio"))]


def test_portal_is_the_dual_stack_wildcard_or_ipv4_without_ipv6(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED[:1], iscsi=True)
    assert by_kind(world.desired(want), PORTAL)[0].name.endswith(" 0.0.0.0:3260")  # World's Want: no IPv6
    dual = msgspec.structs.replace(want, ipv6=True)
    assert by_kind(world.desired(dual), PORTAL)[0].name.endswith(" [::]:3260")


@pytest.mark.parametrize(("model", "vendor", "product"), [
    ("WDC WD10EZEX-00BN5A0", "WDC", "WD10EZEX-00BN5A0"),
    ("Samsung SSD 980 PRO 1TB", "Samsung", "SSD 980 PRO 1TB"),
    ("QEMU HARDDISK", "QEMU", "HARDDISK"),
    ("VERYLONGVENDOR model", "", "VERYLONGVENDOR m"),
    ("storagetm disk", "", "storagetm disk"),  # no first word that is a vendor: LIO's own vendor stays
])  # fmt: skip
def test_inquiry_names_as_far_as_scsi_allows(model: str, vendor: str, product: str) -> None:
    got_vendor, got_product = inquiry_names(model)
    assert len(got_vendor) <= 8 and len(got_product) <= 16
    if model == "storagetm disk":
        assert got_product == product
    else:
        assert (got_vendor, got_product) == (vendor, product)


def test_start_makes_the_lio_tree_and_teardown_empties_it(tmp_path: Path) -> None:
    world = World(tmp_path)
    reconciler, backing, fabrics = world.instance()
    want = world.want(MIXED, auth=True, iscsi=True)
    assert reconciler.apply(desired_state(want, backing, fabrics)) == []
    tree = world.lio.tree()
    export = next(e for e in want.exports.values() if e.mode is Mode.READ_WRITE and not e.disk.is_file)
    iqn = target_iqn(IQN_BASE, export.disk)
    tpg = f"iscsi/{iqn}/tpgt_1"
    store = next(o for o in world.desired(want) if o.kind == BACKSTORE and o.group == export.nqn)
    for line in (f"{tpg}/enable=1", f"{tpg}/attrib/generate_node_acls=1", f"{tpg}/attrib/authentication=1",
                 f"{tpg}/attrib/demo_mode_write_protect=0", f"{tpg}/auth/userid=storagetm",
                 f"{tpg}/auth/password=CHAPSECRET012345", f"{tpg}/param/AuthMethod=CHAP", f"{tpg}/np/0.0.0.0:3260/",
                 f"{tpg}/param/MaxRecvDataSegmentLength=262144", f"{tpg}/param/InitialR2T=No",
                 f"{tpg}/lun/lun_0/storage -> {store.name.rpartition('/')[2]}",
                 f"core/{store.name}/control=udev_path={export.disk.devnode}", f"core/{store.name}/enable=1",
                 f"core/{store.name}/wwn/vpd_unit_serial={store.attr('unit_serial')}"):  # fmt: skip
        assert line in tree, line
    assert store.attr("unit_serial").startswith(export.identity.serial + "-")
    # The portal group is enabled only after its LUN and portal are in place.
    writes = [path for path, _ in world.lio.writes]
    assert writes.index(f"{tpg}/enable") > max(i for i, p in enumerate(writes) if p.startswith(tpg + "/attrib"))
    assert world.lio.links.index(f"{tpg}/lun/lun_0/storage") < writes.index(f"{tpg}/enable")
    reconciler.teardown()
    assert world.lio.tree() == ["core/", "iscsi/"] and world.empty()


def test_turning_iscsi_off_removes_only_its_objects(tmp_path: Path) -> None:
    world = World(tmp_path)
    reconciler, backing, fabrics = world.instance()
    assert reconciler.apply(desired_state(world.want(MIXED, iscsi=True), backing, fabrics)) == []
    nvmet_before = world.fake.tree()
    assert reconciler.apply(desired_state(world.want(MIXED), backing, fabrics)) == []
    assert world.lio.tree() == ["core/", "iscsi/"]
    assert world.fake.tree() == nvmet_before
    assert not [op for op in reconciler.last_ops if op.action == "create"]
    reconciler.teardown()
    assert world.empty()


def test_another_programs_target_fails_that_export_only(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED, iscsi=True)
    taken = sorted(want.exports)[0]
    iqn = target_iqn(IQN_BASE, want.exports[taken].disk)
    world.lio.mkdir(str(world.lio.root / "iscsi" / iqn))
    reconciler, backing, fabrics = world.instance()
    failures = reconciler.apply(desired_state(want, backing, fabrics))
    assert [f.group for f in failures] == [taken] and "made by another program" in failures[0].message
    reconciler.teardown()
    assert world.lio.tree() == sorted(["core/", "iscsi/", f"iscsi/{iqn}/", f"iscsi/{iqn}/fabric_statistics/"])


def test_state_json_names_each_target(tmp_path: Path) -> None:
    world = World(tmp_path)
    want = world.want(MIXED[:1], iscsi=True)
    state = RunState(exports=dict(want.exports), iscsi=IscsiConfig(True, IQN_BASE, "CHAPSECRET012345"))
    data = state.without_secrets().to_json()
    assert data["exports"][0]["iqn"] == target_iqn(IQN_BASE, next(iter(want.exports.values())).disk)
    assert data["iscsi"]["port"] == 3260 and data["iscsi"]["chap"] and data["iscsi"]["chap_user"] == "storagetm"
    assert "CHAPSECRET012345" not in str(data)
    assert RunState.from_json(state.to_json()).iscsi == state.iscsi


def protected_state(n: int) -> RunState:
    from tests.unit.test_dashboard import state_with

    state = state_with(n)
    state.addresses = [Address("ipv6", "fe80::1", "enp0s3", True), Address("ipv4", "169.254.1.2", "enp0s3", True)]
    state.auth = AuthConfig(generate_secret(), generate_secret(), ("nqn.2014-08.org.nvmexpress:uuid:1-2-3",))
    state.tls = TLSConfig(generate_key(), state.auth.hosts)
    state.iscsi = IscsiConfig(True, IQN_BASE, *chap_secrets(state.auth, state.tls))
    return state


def test_screen_tells_windows_how_to_connect_with_chap_and_what_iscsi_does_not_protect() -> None:
    state = protected_state(2)
    text = render(state)
    assert "Windows: iSCSI Initiator → Quick Connect → 169.254.1.2" in text  # IPv4: Windows takes it as typed
    assert "Connect → Advanced → Enable CHAP log on" in text
    assert f"name storagetm, secret {state.iscsi.chap_secret}" in text
    assert f"Configuration → CHAP → {state.iscsi.chap_ctrl_secret}," in text
    assert "iSCSI traffic (port 3260) is not" in text and "The traffic is encrypted" not in text
    assert state.iscsi.chap_secret not in render(state.without_secrets())
    assert all(len(line) <= 80 for line in iscsi_lines(state)), iscsi_lines(state)


def test_iscsi_with_mutual_chap_costs_the_dashboard_five_rows_and_still_fits() -> None:
    state = protected_state(1)
    state.tls = TLSConfig()
    state.addresses = state.addresses[1:]
    with_iscsi = render(state, dashboard=True).splitlines()
    without = render(replace(state, iscsi=IscsiConfig()), dashboard=True).splitlines()
    assert len(with_iscsi) - len(without) <= 5 and len(with_iscsi) <= 25, "\n".join(with_iscsi)


def test_dashboard_with_iscsi_still_fits_80x25() -> None:
    from tests.unit.test_dashboard import state_with

    state = state_with(12)  # anyone may connect: the common case, and the one with most room for disks
    state.addresses = [Address("ipv4", "169.254.1.2", "enp0s3", True)]
    state.iscsi = IscsiConfig(True, IQN_BASE)
    lines = render(state, dashboard=True).splitlines()
    assert len(lines) <= 25 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert any(line.startswith("Windows: iSCSI Initiator") for line in lines)


def test_screen_says_when_iscsi_is_unavailable_and_nvme_goes_on() -> None:
    from tests.unit.test_dashboard import state_with

    state = state_with(1)
    state.addresses = [Address("ipv4", "169.254.1.2", "enp0s3", True)]
    state.iscsi = IscsiConfig(unavailable="cannot load kernel module iscsi_target_mod: not found")
    text = render(state)
    assert "iSCSI is unavailable: cannot load kernel module iscsi_target_mod" in text
    assert "nvme connect-all -t tcp -a 169.254.1.2" in text and "Windows:" not in text


def test_daemon_offers_iscsi_only_on_a_lio_root_it_has(tmp_path: Path) -> None:
    from storagetm.config.settings import Settings
    from tests.unit.test_daemon import attached

    fake, lio_fake = FakeConfigfs(tmp_path / "a"), FakeLio(tmp_path / "a")
    disk = World(tmp_path / "w").disks[0]
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), fake, lio_root=lio.Root(lio_fake.root, lio_fake))
    daemon.state.iscsi = daemon.iscsi_config("0123456789ab")
    daemon.disks[disk.devnode] = disk
    daemon.export_wanted()
    assert daemon.state.problems == [] and len(daemon.state.exports) == 1
    assert [p for p in lio_fake.tree() if p.endswith("/enable=1") and p.startswith("iscsi/")]
    daemon.reconciler.teardown()  # type: ignore[union-attr]
    assert lio_fake.tree() == ["core/", "iscsi/"]
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    without = attached(tmp_path / "b", Settings(), FakeConfigfs(tmp_path / "b"))
    without.iscsi_unavailable = "no LIO"
    assert without.iscsi_config("0123456789ab") == IscsiConfig(unavailable="no LIO")
    assert attached(tmp_path / "c", Settings(iscsi=False), FakeConfigfs(tmp_path / "c")).iscsi_config("x") == (
        IscsiConfig())  # fmt: skip


def test_a_hot_plugged_disk_is_on_nvme_tcp_before_iscsi_is_made(tmp_path: Path) -> None:
    """A watching NVMe/TCP initiator connects as soon as the disk is linked: iSCSI's objects
    come after every nvmet object, so the second fabric adds nothing to that latency."""
    world = World(tmp_path)
    reconciler, backing, fabrics = world.instance()
    assert reconciler.apply(desired_state(world.want(MIXED[:1], iscsi=True), backing, fabrics)) == []
    assert reconciler.apply(desired_state(world.want(MIXED[:2], iscsi=True), backing, fabrics)) == []
    made = [op.key[0] for op in reconciler.last_ops if op.action == "create"]
    lio_kinds = [i for i, kind in enumerate(made) if kind.startswith(("iscsi", "lio"))]
    assert lio_kinds and max(i for i, kind in enumerate(made) if kind.startswith("nvmet")) < min(lio_kinds), made
    reconciler.teardown()


def test_at_a_first_start_iscsi_follows_the_nvme_tcp_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LIO's modules are not loaded at boot (modprobe takes a second or more then): the disks
    are on NVMe/TCP before they are loaded, and a LIO that cannot be had costs iSCSI only."""
    from collections.abc import Iterator

    from storagetm import daemon as daemon_module
    from storagetm.config.settings import Settings
    from storagetm.disks.udev import DiskEvent
    from storagetm.errors import KernelError
    from storagetm.system import firmware, network
    from tests.unit.test_daemon import attached

    fake = FakeConfigfs(tmp_path / "a")
    disk, late = World(tmp_path / "w").disks[:2]
    daemon = attached(tmp_path, Settings(devices=(disk.devnode, late.devnode), web=False), fake)
    linked_when_asked: list[list[str]] = []
    exported_when_addresses_asked: list[int] = []

    def ensure_lio() -> Path:
        linked_when_asked.append([p for p in fake.tree() if p.startswith("ports/") and "/subsystems/" in p])
        raise KernelError("cannot load kernel module target_core_mod: not found")

    def local_addresses() -> list[object]:
        exported_when_addresses_asked.append(len(daemon.state.exports))
        return []

    class Devices:
        """One disk there at enumeration; the second found by the kernel while modprobe ran."""

        def enumerate(self) -> list[object]:
            return [disk]

        def events(self) -> Iterator[DiskEvent]:
            return iter([DiskEvent("add", late)] if linked_when_asked else [])

    monkeypatch.setattr(daemon_module, "ensure_lio", ensure_lio)
    monkeypatch.setattr(daemon_module, "host_identity", lambda: "0123456789abcdef")
    monkeypatch.setattr(network, "local_addresses", local_addresses)
    monkeypatch.setattr(firmware, "secure_boot", lambda: False)
    monkeypatch.setattr(daemon_module, "explicit_files", lambda settings: [])  # the disks come as devices only
    daemon._start(Devices(), None)  # type: ignore[arg-type]
    assert len(linked_when_asked) == 1 and linked_when_asked[0], "LIO was asked for before the disk was linked"
    assert exported_when_addresses_asked[0] == 2  # the late disk went out before the addresses and the rest
    assert daemon.state.iscsi == IscsiConfig(unavailable="cannot load kernel module target_core_mod: not found")
    assert len(daemon.state.exports) == 2 and daemon.lio_root is None
    daemon.reconciler.teardown()  # type: ignore[union-attr]
