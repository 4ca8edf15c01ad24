"""Local addresses an initiator can use, and a netlink socket that says when they change."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from pathlib import Path

from msgspec import Struct

from storagetm.text import printable

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class Address(Struct, frozen=True, order=True):
    family: str  # "ipv4" or "ipv6"
    address: str
    interface: str
    link_local: bool

    @property
    def bindable(self) -> str:
        """The address as a listening socket binds it: link-local IPv6 with its zone."""
        return f"{self.address}%{self.interface}" if self.family == "ipv6" and self.link_local else self.address

    @property
    def for_command(self) -> str:
        """The address as an nvme-cli `-a` argument; link-local IPv6 needs its zone."""
        if self.family == "ipv6" and self.link_local:
            # The discovery log's entries carry no zone, so nvme-cli also needs -f
            # (host_iface) to connect their I/O queues to a link-local address.
            return f"{self.address}%{self.interface} -f {self.interface}"
        return self.address


def parse_ip_json(text: str) -> list[Address]:
    """Usable addresses from `ip -j address show` output: no loopback, no tentative."""
    result: list[Address] = []
    for link in json.loads(text or "[]"):
        ifname = printable(link.get("ifname", ""))  # a name may hold any byte but / and spaces
        if "LOOPBACK" in link.get("flags", []) or link.get("operstate") == "DOWN":
            continue
        for info in link.get("addr_info", []):
            family = {"inet": "ipv4", "inet6": "ipv6"}.get(info.get("family", ""))
            local = info.get("local")
            if family is None or not local or info.get("tentative") or info.get("dadfailed"):
                continue
            ip = ipaddress.ip_address(local)
            result.append(Address(family, local, ifname, ip.is_link_local))
    # Routable addresses first, IPv4 before IPv6, then by interface.
    return sorted(result, key=lambda a: (a.link_local, a.family, a.interface, a.address))


def local_addresses() -> list[Address]:
    out = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True, check=False)
    return parse_ip_json(out.stdout) if out.returncode == 0 else []


def ipv6_available() -> bool:
    return Path("/proc/sys/net/ipv6").is_dir() and Path("/proc/net/if_inet6").exists()


def address_monitor() -> socket.socket:
    """A non-blocking rtnetlink socket that becomes readable when links or addresses change."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)  # fmt: skip
    sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    return sock


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        pass
