"""Network boot servers for the VM suite, reaching nothing outside this machine:
QEMU's own TFTP (user network with restrict=on) for PXE, and dnsmasq + an HTTP server
in a network namespace of our own for UEFI HTTP boot, configured by docs/netboot/dnsmasq.conf."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from testbed.wait import until

REPO = Path(__file__).resolve().parents[1]
DNSMASQ_CONF = REPO / "docs" / "netboot" / "dnsmasq.conf"
SERVER = "10.42.0.1"  # the documented example address, used as is
TAP = "stmboot0"
BOOT_FILE = "storagetm.efi"


def tftp_boot_nic(root: Path, mac: str) -> list[str]:
    """A NIC that PXE-boots storagetm.efi from QEMU's built-in TFTP server. No NIC has an
    option ROM (romfile=), so PXE is the firmware's own: QEMU 7.2's iPXE ROM loaded the
    image, but the kernel then hung."""
    return ["-netdev", f"user,id=boot,restrict=on,tftp={root},bootfile={BOOT_FILE}",
            "-device", f"virtio-net-pci,netdev=boot,mac={mac},romfile=,bootindex=1,addr=0x9"]  # fmt: skip


def http_boot_nic(mac: str) -> list[str]:
    """A NIC on the namespace's tap device, with OVMF's PXE switched off so that the boot
    that happens is UEFI HTTP boot and nothing else."""
    return ["-netdev", f"tap,id=boot,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=boot,mac={mac},romfile=,bootindex=1,addr=0x9",
            "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
            "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no",
            "-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=no"]  # fmt: skip


def _netns(namespace: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, *argv], check=True, capture_output=True, timeout=30)


def _wait_listening(namespace: str, port: int, timeout: float) -> None:
    def listening() -> bool:
        out = subprocess.run(["ip", "netns", "exec", namespace, "ss", "-Htln"], capture_output=True, text=True)
        return f"{SERVER}:{port} " in out.stdout

    until(listening, timeout, f"nothing listens on {SERVER}:{port} in {namespace} after {timeout:.0f} s", pause=0.2)


@contextlib.contextmanager
def http_boot_network(workdir: Path, efi: Path) -> Iterator[list[str]]:
    """A namespace with a tap device, dnsmasq and an HTTP server; yields the prefix that
    runs QEMU inside it. The logs (dnsmasq.log, http.log) stay in `workdir`."""
    namespace = f"storagetm-test-{os.getpid()}"
    root = workdir / "srv"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(efi, root / BOOT_FILE)
    conf = workdir / "dnsmasq.conf"
    conf.write_text(DNSMASQ_CONF.read_text().replace("/srv/storagetm", str(root)))
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True, timeout=30)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        _netns(namespace, "ip", "link", "set", "lo", "up")
        _netns(namespace, "ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        _netns(namespace, "ip", "addr", "add", f"{SERVER}/24", "dev", TAP)
        _netns(namespace, "ip", "link", "set", TAP, "up")
        inside = ["ip", "netns", "exec", namespace]
        with open(workdir / "http.log", "wb") as http_log:
            servers.append(subprocess.Popen(
                [*inside, sys.executable, "-m", "http.server", "--bind", SERVER, "--directory", str(root), "80"],
                stdout=http_log, stderr=subprocess.STDOUT))  # fmt: skip
        servers.append(subprocess.Popen(
            [*inside, "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", f"--interface={TAP}",
             "--bind-interfaces", "--user=root", "--pid-file=", f"--dhcp-leasefile={workdir / 'leases'}",
             f"--log-facility={workdir / 'dnsmasq.log'}"]))  # fmt: skip
        _wait_listening(namespace, 80, 10)
        yield inside
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
