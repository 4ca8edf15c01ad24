"""Find storagetm targets on the local links: the `_nvme-disc._tcp` service (NVMe TP 8009)
each target announces over mDNS, browsed with systemd-resolved or, failing that, avahi."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from storagetm.errors import StorageTMError

SERVICE_TYPE = "_nvme-disc._tcp"
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]
Which = Callable[[str], str | None]
INSTALL = ("cannot look for targets over mDNS: neither systemd-resolved (resolvectl) nor avahi (avahi-browse) "
           "is available")  # fmt: skip
INSTALL_HINT = ("install avahi-utils (with avahi-daemon running), or enable MulticastDNS=yes in systemd-resolved; "
                "or give the target's address or connection code")  # fmt: skip


class DiscoveryError(StorageTMError):
    pass


@dataclass(frozen=True)
class Announced:
    name: str  # the service instance, the target's host name
    host: str  # its mDNS host name, NAME.local
    port: int
    addresses: tuple[str, ...]  # without zone
    txt: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C")
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30, env=env)


def _address(text: str) -> str:
    """The IP of `addr` or `addr%zone`, or "" if it is none."""
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return ""


def parse_resolvectl_ptr(text: str) -> list[str]:
    """Service instance labels of `resolvectl query -t PTR _nvme-disc._tcp.local`."""
    labels = []
    for match in re.finditer(r"\bIN PTR (\S+?)\." + re.escape(SERVICE_TYPE) + r"\.local\b", text):
        label = match.group(1).replace("\\032", " ")
        if label not in labels:
            labels.append(label)
    return labels


def parse_resolvectl_service(text: str) -> Announced | None:
    """`resolvectl service NAME _nvme-disc._tcp local`: a heading `NAME/TYPE/local: HOST:PORT [...]`,
    then indented lines, each an address or a TXT `key=value`."""
    lines = text.splitlines()
    # resolved 257 writes NAME/_nvme-disc._tcp/local; a dotted NAME._nvme-disc._tcp.local is taken too.
    heading = next((re.match(r"^(\S.*?)[./]" + re.escape(SERVICE_TYPE) + r"[./]local: (\S+):(\d+)", line)
                    for line in lines if not line.startswith(" ")), None)  # fmt: skip
    if heading is None:
        return None
    addresses: list[str] = []
    txt: dict[str, str] = {}
    for line in lines[1:]:
        value = line.strip()
        if not line.startswith(" ") or not value:
            continue
        # An address line may end in "-- link: IFACE", and carry a %zone (an ifindex).
        if address := _address(value.split()[0]):
            addresses.append(address)
        elif "=" in value:
            key, _, rest = value.partition("=")
            txt[key] = rest
    return Announced(heading.group(1), heading.group(2), int(heading.group(3)), tuple(dict.fromkeys(addresses)), txt)


def browse_resolved(runner: Runner = run) -> list[Announced]:
    result = runner(["resolvectl", "query", "-p", "mdns", "-t", "PTR", f"{SERVICE_TYPE}.local"])
    if result.returncode != 0:
        if "No appropriate name servers" in result.stderr or "not found" in result.stderr.lower():
            return []  # resolved runs and found nothing
        raise DiscoveryError(f"resolvectl: {result.stderr.strip() or 'failed'}")
    found = []
    for label in parse_resolvectl_ptr(result.stdout):
        service = runner(["resolvectl", "service", label, SERVICE_TYPE, "local"])
        announced = parse_resolvectl_service(service.stdout) if service.returncode == 0 else None
        if announced is not None:
            found.append(announced)
    return found


def _avahi_unescape(text: str) -> str:
    return re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), text)


def parse_avahi(text: str) -> list[Announced]:
    """`avahi-browse -rpt _nvme-disc._tcp`: one resolved `=;iface;proto;name;type;domain;
    host;address;port;"txt" "txt"` line per interface and protocol."""
    by_name: dict[str, Announced] = {}
    for line in text.splitlines():
        parts = line.split(";")
        if len(parts) < 9 or parts[0] != "=" or parts[4] != SERVICE_TYPE or not parts[8].isdecimal():
            continue  # not a resolved record of ours, or a port that is no number: not a target to offer
        name, host, address, port = _avahi_unescape(parts[3]), parts[6], _address(parts[7]), int(parts[8])
        txt = dict(t.partition("=")[::2] for t in re.findall(r'"([^"]*)"', ";".join(parts[9:])))
        before = by_name.get(name)
        addresses = (*before.addresses, address) if before else (address,)
        by_name[name] = Announced(name, host, port, tuple(a for a in dict.fromkeys(addresses) if a),
                                  before.txt if before else txt)  # fmt: skip
    return list(by_name.values())


def browse_avahi(runner: Runner = run) -> list[Announced]:
    result = runner(["avahi-browse", "-rpt", SERVICE_TYPE])
    if result.returncode != 0:
        raise DiscoveryError(f"avahi-browse: {result.stderr.strip() or 'failed'}")
    return parse_avahi(result.stdout)


def browse(runner: Runner = run, which: Which = shutil.which) -> list[Announced]:
    """Every announced target (TXT p=tcp), by whichever browser works here."""
    problems: list[str] = []
    for tool, browser in (("resolvectl", browse_resolved), ("avahi-browse", browse_avahi)):
        if which(tool) is None:
            continue
        try:
            return [a for a in browser(runner) if a.txt.get("p", "tcp") == "tcp" and a.addresses]
        except (DiscoveryError, OSError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc).splitlines()[0] if str(exc) else tool)
    if problems:
        raise DiscoveryError("cannot look for targets over mDNS: " + "; ".join(problems), hint=INSTALL_HINT)
    raise DiscoveryError(INSTALL, hint=INSTALL_HINT)
