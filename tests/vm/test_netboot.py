"""Booting the image from the network, as a lab does: UEFI PXE (TFTP) and UEFI HTTP boot,
each to target mode on a second NIC linked to the initiator, which reads the disk back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, wait_address
from testbed.machine import VM, Disk, make_disk
from testbed.netboot import BOOT_FILE, DNSMASQ_CONF, http_boot_network, http_boot_nic, tftp_boot_nic
from testbed.pair import LOGS, image, running_initiator, target_vm

pytestmark = [pytest.mark.vm, pytest.mark.slow]

WORKDIR = LOGS / "test_netboot"
LINK = WORKDIR / "link.sock"
NETBOOT_TIMEOUT = 600  # firmware DHCP + a 60 MiB download under TCG, then the boot


@pytest.fixture(scope="module")
def initiator() -> Iterator[VM]:
    """One initiator for both boots: it serves the link, each target joins it in turn."""
    with running_initiator(WORKDIR, LINK) as vm:
        yield vm


def network_booted_target(name: str, boot_nic: list[str], wrapper: list[str] | None = None) -> tuple[VM, str]:
    """A target with no -kernel: OVMF's boot order starts with the boot NIC."""
    workdir = WORKDIR / name
    disk = Disk(workdir / "NETB0001.img", "virtio", "NETB0001")
    workdir.mkdir(parents=True, exist_ok=True)
    digest = make_disk(disk.path, 16 << 20, b"NETB0001")
    return target_vm(workdir, LINK, kernel=None, disks=[disk], extra=boot_nic, wrapper=wrapper or []), digest


def reads_back(target: VM, initiator: VM, digest: str) -> None:
    target.wait_for(r"Exported disks \(1\)", NETBOOT_TIMEOUT)
    address = wait_address(target, "169.254.")
    disconnect_all(initiator)
    try:
        # The target has two networks here (QEMU's boot network first, then the cable): the
        # discovery port on the cable's address refers to that address, which this initiator reaches.
        initiator.sh(f"{CONNECT_ALL} -a {address}")
        (remote,) = connected(initiator)
        assert remote.serial == "NETB0001"
        assert initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300).split()[0] == digest
    finally:
        disconnect_all(initiator)


def test_pxe_boot_over_tftp(initiator: VM) -> None:
    tftp_root = WORKDIR / "tftp"
    tftp_root.mkdir(parents=True, exist_ok=True)
    (tftp_root / BOOT_FILE).write_bytes(image("storagetm.efi").read_bytes())
    target, digest = network_booted_target("pxe", tftp_boot_nic(tftp_root, "52:54:00:00:00:0b"))
    with target:
        target.wait_for(r'starting Boot\d+ "UEFI PXEv4', NETBOOT_TIMEOUT)
        reads_back(target, initiator, digest)


def test_uefi_http_boot(initiator: VM) -> None:
    workdir = WORKDIR / "http"
    workdir.mkdir(parents=True, exist_ok=True)
    with http_boot_network(workdir, image("storagetm.efi")) as inside_namespace:
        target, digest = network_booted_target("http", http_boot_nic("52:54:00:00:00:0c"), inside_namespace)
        with target:
            target.wait_for(r'starting Boot\d+ "UEFI HTTPv4', NETBOOT_TIMEOUT)
            reads_back(target, initiator, digest)
            # Booted, the image takes a DHCP lease on the boot NIC too, and offers it on screen.
            wait_address(target, "10.42.0.")
        assert f'"GET /{BOOT_FILE} HTTP/1.1" 200' in (workdir / "http.log").read_text()
        assert "HTTPClient" in (workdir / "dnsmasq.log").read_text()


def test_netboot_config_in_docs_is_the_one_tested() -> None:
    """README points lab administrators at docs/netboot/dnsmasq.conf; the HTTP boot test
    uses it with only the served directory replaced."""
    text = DNSMASQ_CONF.read_text()
    assert "tftp-root=/srv/storagetm" in text and "http://10.42.0.1/storagetm.efi" in text
