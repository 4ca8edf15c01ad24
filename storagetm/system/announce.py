"""Let the other machine find the target: a DNS-SD `_nvme-disc._tcp` service (NVMe TP 8009)
published over mDNS by systemd-resolved, and a host name people can tell apart."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from storagetm.model import DISCOVERY_NQN, DISCOVERY_TRSVCID
from storagetm.system.log import Logger
from storagetm.text import printable

log = Logger(__name__)

DNSSD_DIR = Path("/run/systemd/dnssd")
# Installed is enough: storagetm starts before resolved, which reads the .dnssd file when it starts.
RESOLVED = Path("/usr/lib/systemd/systemd-resolved")
# systemd keeps this link while the unit is active or activating.
RESOLVED_RUNNING = Path("/run/systemd/units/invocation:systemd-resolved.service")
SERVICE_FILE = "storagetm-discovery.dnssd"
SERVICE_TYPE = "_nvme-disc._tcp"
IMAGE_HOSTNAMES = {"", "localhost", "storagetm"}  # names not worth keeping: the image's own


def recognisable_hostname(host_id: str) -> str:
    """storagetm-<host id>: the same id as in the disks' NQNs, stable across reboots."""
    return f"storagetm-{host_id}"


def service_text(port: int = DISCOVERY_TRSVCID) -> str:
    return (
        "# Written by storagetm while it serves; removed when it stops.\n"
        "[Service]\n"
        "Name=%H\n"
        f"Type={SERVICE_TYPE}\n"
        f"Port={port}\n"
        f"TxtText=p=tcp NQN={DISCOVERY_NQN}\n"
    )


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("systemctl %s: %s", " ".join(args), result.stderr.strip())


def restart_resolved_if_running(running: Path = RESOLVED_RUNNING) -> None:
    """At boot storagetm starts before resolved (its unit orders it so), which then reads the
    file itself: no systemctl run, no restart, while every process competes for the CPU."""
    if running.is_symlink():
        _systemctl("try-restart", "--no-block", "systemd-resolved")


class Announcer:
    """Publishes the discovery service while storagetm serves. systemd-resolved reads
    .dnssd files when it starts, so it is restarted after each change if it is running."""

    def __init__(
        self,
        dnssd_dir: Path = DNSSD_DIR,
        resolved: Path = RESOLVED,
        restart_resolved: Callable[[], None] = restart_resolved_if_running,
        get_hostname: Callable[[], str] = socket.gethostname,
        set_hostname: Callable[[str], None] = socket.sethostname,
    ) -> None:
        self.service = dnssd_dir / SERVICE_FILE
        self.resolved = resolved
        self.restart_resolved = restart_resolved
        self.get_hostname = get_hostname
        self.set_hostname = set_hostname

    def publish(self, host_id: str, port: int = DISCOVERY_TRSVCID) -> str:
        """Announce; return the mDNS name the target is found under ("" if not announced)."""
        if not self.resolved.exists():
            log.warning("not announcing over mDNS: systemd-resolved is not installed")
            return ""
        hostname = printable(self.get_hostname())  # shown on the screen
        if hostname in IMAGE_HOSTNAMES:
            hostname = recognisable_hostname(host_id)
            self.set_hostname(hostname)
        text = service_text(port)
        if not (self.service.exists() and self.service.read_text() == text):
            self.service.parent.mkdir(parents=True, exist_ok=True)
            self.service.write_text(text)
            self.restart_resolved()
        log.info("announced %s on %s.local (mDNS)", SERVICE_TYPE, hostname)
        return f"{hostname}.local"

    def withdraw(self) -> None:
        if self.service.exists():
            self.service.unlink()
            self.restart_resolved()
