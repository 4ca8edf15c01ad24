"""iSCSI, the second fabric (for Windows' built-in initiator), from a Linux initiator with
open-iscsi: SendTargets discovery finds one target per disk, each LUN reads as its disk
file, a write reaches a read-write disk and fails on a read-only one, INQUIRY shows the
disk's names, a hot-plugged disk is found on a new discovery, and stopping storagetm leaves
nothing of LIO's behind. CHAP is in test_auth.py (its target requires authentication)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.initiator import wait_address
from testbed.iscsi import discover, login, logout_all, prepare_iscsi, targets_by_serial
from testbed.machine import Disk, make_disk
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

DISKS = {"ISCSIRW1": "virtio", "ISCSIRO1": "sata"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.mode=rw,ISCSIRO1=ro"
LIO_TARGETS = "/sys/kernel/config/target/iscsi"


@pytest.fixture
def iscsi(pair: Pair) -> Iterator[tuple[Pair, str]]:
    """The pair, iscsid running on the initiator, every disk exported, and the address the
    screen shows for Windows; logged out and forgotten afterwards whatever the test did."""
    pair.target.wait_for(r"Exported disks \(2\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "169.254.")
    prepare_iscsi(pair.initiator)
    discover(pair.initiator, address)  # the node records a login needs (the last test deleted them)
    try:
        yield pair, address
    finally:
        logout_all(pair.initiator)


def test_screen_tells_windows_users_the_address(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    assert f"Windows: iSCSI Initiator → Quick Connect → {address}" in pair.target.console()


def test_sendtargets_finds_one_target_per_disk_on_the_address_asked(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    found = discover(pair.initiator, address)
    assert sorted(found) == sorted(targets_by_serial(pair.target).values())
    assert set(found.values()) == {f"{address}:3260"}  # the wildcard portal answers with the address asked
    # The same over IPv6 (one dual-stack portal on [::]:3260).
    ipv6 = wait_address(pair.target, "fe80::").split()[0]
    assert sorted(discover(pair.initiator, f"[{ipv6}]")) == sorted(found)


def test_every_lun_reads_as_its_disk_and_shows_its_names(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    wwids = set()
    for serial, iqn in targets_by_serial(pair.target).items():
        device = login(pair.initiator, iqn, f"{address}:3260")
        out = pair.initiator.sh(f"sha256sum {device}", timeout=300)
        assert out.split()[0] == pair.sum_now(serial), serial
        block = f"/sys/block/{Path(device).name}/device"
        page80 = pair.initiator.sh(f"tail -c +5 {block}/vpd_pg80 | tr -d '\\0'").strip()
        assert page80.startswith(f"{serial}-"), page80  # VPD unit serial: the disk's, then a hash
        wwids.add(pair.initiator.sh(f"cat {block}/wwid").strip())
        if serial == "ISCSIRO1":  # QEMU's IDE disk of model "STM SATA DISK"
            assert pair.initiator.sh(f"cat {block}/vendor").strip() == "STM"
            assert pair.initiator.sh(f"cat {block}/model").strip() == "SATA DISK"
    assert len(wwids) == 2 and all(w.startswith("naa.6001405") for w in wwids), wwids


def test_a_write_reaches_the_read_write_disk(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    device = login(pair.initiator, targets_by_serial(pair.target)["ISCSIRW1"], f"{address}:3260")
    pair.initiator.sh(f"printf iscsi-write | dd of={device} bs=512 seek=8 conv=sync,fsync oflag=direct")
    with open(pair.disks["ISCSIRW1"].path, "rb") as disk:
        disk.seek(8 * 512)
        assert disk.read(11) == b"iscsi-write"


def test_the_session_negotiates_large_pdus_and_no_initial_r2t(iscsi: tuple[Pair, str]) -> None:
    """LIO's defaults (8 KiB data segments from the initiator, InitialR2T=Yes) cost iSCSI
    writes a third of their speed here; the portal group offers more and the session takes it."""
    pair, address = iscsi
    login(pair.initiator, targets_by_serial(pair.target)["ISCSIRW1"], f"{address}:3260")
    negotiated = pair.initiator.sh("iscsiadm -m session -P 2")
    for line in ("MaxXmitDataSegmentLength: 262144", "FirstBurstLength: 262144", "MaxBurstLength: 1048576",
                 "InitialR2T: No", "ImmediateData: Yes"):  # fmt: skip
        assert line in negotiated, negotiated


def test_every_write_fails_on_the_read_only_disk(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    device = login(pair.initiator, targets_by_serial(pair.target)["ISCSIRO1"], f"{address}:3260")
    out, rc = pair.initiator.run(f"printf refused | dd of={device} bs=512 seek=8 conv=sync,fsync oflag=direct")
    assert rc != 0, out
    assert pair.sum_now("ISCSIRO1") == pair.sums["ISCSIRO1"]


def test_a_hot_plugged_disk_is_found_on_rescan(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    hot = Disk(pair.disks["ISCSIRW1"].path.parent / "ISCSIHOT.img", "virtio", "ISCSIHOT")
    sha = make_disk(hot.path, 16 << 20, b"ISCSIHOT")
    before = discover(pair.initiator, address)
    pair.target.hotplug(hot)
    try:
        until(lambda: len(discover(pair.initiator, address)) == len(before) + 1, 60,
              "the hot-plugged disk's target is not discovered")  # fmt: skip
        iqn = targets_by_serial(pair.target)["ISCSIHOT"]
        device = login(pair.initiator, iqn, f"{address}:3260")
        assert pair.initiator.sh(f"sha256sum {device}", timeout=300).split()[0] == sha
    finally:
        logout_all(pair.initiator)
        pair.target.unplug(hot)
    until(lambda: "iscsihot" not in " ".join(discover(pair.initiator, address)), 60, "unplugged target still listed")


def test_logout_and_stop_leave_no_lio_objects(iscsi: tuple[Pair, str]) -> None:
    pair, address = iscsi
    login(pair.initiator, targets_by_serial(pair.target)["ISCSIRW1"], f"{address}:3260")
    logout_all(pair.initiator)
    pair.target.sh("systemctl stop storagetm")
    # LIO's own attributes (cpus_allowed_list, lio_version) and discovery_auth group stay.
    assert [name for name in pair.target.sh(f"ls -A {LIO_TARGETS}").split() if name.startswith("iqn.")] == []
    assert pair.target.sh("ls -A /sys/kernel/config/target/core").split() in ([], ["alua"])
    assert ":3260" not in pair.target.sh("ss -Htln")
