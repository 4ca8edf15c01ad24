from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from storagetm.config.options import apply_kernel_cmdline
from storagetm.config.settings import Settings
from storagetm.console.screen import render
from storagetm.disks.disk import Disk
from storagetm.disks.identity import check_nqn_prefix, host_identity, identity_for, valid_nqn
from storagetm.disks.policy import Reason, SystemFacts, loader_partuuid
from storagetm.selection import plan
from storagetm.state import RunState
from storagetm.system.network import parse_ip_json

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"


def disk(name: str, **kw: object) -> Disk:
    minor = zlib.crc32(name.encode()) % 4096
    values: dict[str, object] = {"devnode": f"/dev/{name}", "devnum": os.makedev(8, minor), "devtype": "disk",
                                 "size": 1 << 30, "model": "Disk", "serial": f"S-{name}"}  # fmt: skip
    values.update(kw)
    return Disk(name=name, **values)  # type: ignore[arg-type]


def test_policy_reasons() -> None:
    root = disk("sda")
    disks = [root, disk("sda1", devtype="partition"), disk("loop0"), disk("zram0"), disk("sr0", cdrom=True),
             disk("sdc", size=0), disk("nvme1n1", nvme_transport="tcp"), disk("sdd")]  # fmt: skip
    facts = SystemFacts(root_disks=frozenset({root.devnum}))
    result = plan(disks, Settings(all_disks=True), facts, BASE)
    assert [e.disk.name for e in result.exports.values()] == ["sdd"]
    reasons = {d.name: r for d, r in result.not_exported}
    assert reasons == {"sda": Reason.ROOT, "sr0": Reason.OPTICAL, "sdc": Reason.EMPTY, "nvme1n1": Reason.FABRICS}
    # Virtual devices are listed only when asked for by name.
    named = plan(disks, Settings(devices=("loop0",)), facts, BASE)
    assert (disks[2], Reason.VIRTUAL) in named.not_exported
    lifted = plan(disks, Settings(all_disks=True, lift_guards=True), facts, BASE)
    assert sorted(e.disk.name for e in lifted.exports.values()) == ["sda", "sdd"]


def test_boot_medium_never_exported_unless_guards_lifted() -> None:
    stick = disk("sdb")
    facts = SystemFacts(boot_disks=frozenset({stick.devnum}))
    assert plan([stick], Settings(devices=("sdb",)), facts, BASE).exports == {}
    assert plan([stick], Settings(all_disks=True, lift_guards=True), facts, BASE).exports


def test_boot_medium_found_by_partition_uuid_before_udev_links() -> None:
    stick = disk("sdb", part_uuids=("aaaa-1", "5354524d-0000-4000-8000-000000000002"))
    facts = SystemFacts(boot_partuuid="5354524d-0000-4000-8000-000000000002")
    result = plan([stick, disk("sdc")], Settings(all_disks=True), facts, BASE)
    assert [e.disk.name for e in result.exports.values()] == ["sdc"]
    assert result.not_exported == [(stick, Reason.BOOT_MEDIUM)]


def test_loader_partuuid(tmp_path: Path) -> None:
    value = "ABCDEF01-2345-6789-ABCD-EF0123456789"
    var = tmp_path / "LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    var.write_bytes(b"\x06\0\0\0" + (value + "\0").encode("utf-16-le"))
    assert loader_partuuid(tmp_path) == value.lower()


def test_nqn_is_stable_across_renames_and_valid() -> None:
    a = identity_for(BASE, disk("sda", serial="XYZ", model="Samsung SSD 870"))
    b = identity_for(BASE, disk("sdb", serial="XYZ", model="Samsung SSD 870"))
    assert a == b
    assert valid_nqn(a.nqn) and a.nqn.endswith(".samsung-ssd-870-xyz")
    assert identity_for(BASE, disk("nvme0n2", serial="S1")).nqn.endswith("-n2")


def test_model_and_serial_truncated_as_nvmet_requires() -> None:
    ident = identity_for(BASE, disk("sda", model="M" * 50, serial="S" * 30))
    assert len(ident.model) == 40 and len(ident.serial) == 20


def test_bad_nqn_prefix_rejected() -> None:
    from storagetm.errors import UsageError

    for bad in ("not an nqn", "-dash", "", "bad!", "nqn.2024-01.com.example:with space"):
        with pytest.raises(UsageError, match="invalid NQN prefix"):
            check_nqn_prefix(bad)


def test_a_plain_prefix_is_taken_as_upstream_does() -> None:
    """systemd's TEST-84 passes --nqn=quux: taken (a warning on the screen says initiators
    other than Linux's may refuse it), and the NVMe form of course."""
    from storagetm.disks.identity import nvme_form

    assert check_nqn_prefix("quux") == "quux" and not nvme_form("quux")
    assert check_nqn_prefix("nqn.2024-01.com.example:lab") and nvme_form("nqn.2024-01.com.example:lab")


def test_host_identity_skips_bogus_dmi(tmp_path: Path) -> None:
    (tmp_path / "product_uuid").write_text("00000000-0000-0000-0000-000000000000\n")
    (tmp_path / "product_serial").write_text("To Be Filled By O.E.M.\n")
    (tmp_path / "board_serial").write_text("BSN123\n")
    assert host_identity(tmp_path) == "board_serial:bsn123"


def test_kernel_cmdline_bad_values_named_rest_applies() -> None:
    settings, problems = apply_kernel_cmdline(
        Settings(all_disks=True), "quiet storagetm.disks=sdb,SERIAL1 storagetm.port=abc storagetm.bogus=1"
    )
    assert settings.devices == ("sdb", "SERIAL1") and not settings.all_disks and settings.port == 4420
    assert problems[0] == ("storagetm.port='abc' is not valid: expects a TCP port number 1-65535 — using the default; "
                           "fix the boot option")  # fmt: skip
    # An unknown option may be a mistyped one that limits access: nothing is exported.
    assert problems[1].startswith("unknown option storagetm.bogus (known: disks, nqn, port, mode")
    assert problems[1].endswith("— exporting nothing; fix or remove it")
    assert settings.refusals == ("storagetm.bogus",)


def test_explicit_selection_only() -> None:
    result = plan([disk("sdb"), disk("sdc")], Settings(devices=("S-sdc",)), SystemFacts(), BASE)
    assert [e.disk.name for e in result.exports.values()] == ["sdc"]


def test_screen_shows_link_local_with_zone_and_disks() -> None:
    addrs = parse_ip_json(
        '[{"ifname":"lo","flags":["LOOPBACK"],"addr_info":[{"family":"inet","local":"127.0.0.1"}]},'
        '{"ifname":"enp1s0","flags":[],"operstate":"UP","addr_info":['
        '{"family":"inet","local":"192.0.2.5"},{"family":"inet6","local":"fe80::1"},'
        '{"family":"inet6","local":"fe80::2","tentative":true}]}]'
    )
    d = disk("sdb")
    from storagetm.model import Export

    export = Export(d, identity_for(BASE, d))
    text = render(RunState(addresses=addrs, exports={export.nqn: export}))
    assert "nvme connect-all -t tcp -a 192.0.2.5\n" in text
    assert "nvme connect-all -t tcp -a fe80::1%enp1s0 -f enp1s0\n" in text
    assert "fe80::2" not in text and "127.0.0.1" not in text
    assert export.nqn in text and "READ AND WRITE" in text


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("nqn.2024-01.com.example:lab/x", "'/' cannot be in an NQN"),
        ("nqn.2024-01.com.example:lab\n", "holds a newline"),
        ("nqn.2024-01.com.example:" + "x" * 150, "is 174 bytes, at most 143 fit"),
        ("nqn.2024-01.com.example:" + "é" * 70, "is 164 bytes, at most 143 fit"),  # 70 characters, 164 bytes
    ],
)
def test_nqn_prefix_refused_with_its_reason(prefix: str, reason: str) -> None:
    from storagetm.errors import UsageError

    with pytest.raises(UsageError, match=reason):
        check_nqn_prefix(prefix)
    settings, problems = apply_kernel_cmdline(Settings(), f'storagetm.nqn="{prefix}"')
    assert settings.nqn_base is None and len(problems) == 1 and reason in problems[0]


def test_longest_prefix_leaves_room_for_every_identity() -> None:
    from storagetm.disks.identity import NQN_MAX, PREFIX_MAX

    prefix = check_nqn_prefix("nqn.2024-01.com.example:" + "x" * (PREFIX_MAX - 24))
    long_disk = disk("sda", model="M" * 40, serial="S" * 40)
    nqn = identity_for(prefix, long_disk).nqn
    assert len(nqn.encode()) <= NQN_MAX and valid_nqn(nqn)
