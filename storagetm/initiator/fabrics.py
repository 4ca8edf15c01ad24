"""NVMe/TCP on the initiator: what must be there, the discovery log (nvme-cli), connecting
(the kernel's /dev/nvme-fabrics) and what is connected (sysfs).

Connecting writes the options to /dev/nvme-fabrics as nvme-cli itself does, rather than
running `nvme connect`: nvme-cli takes a DH-HMAC-CHAP secret only on its command line (or in
a JSON config file), and a command line is readable by every user of the machine. The
discovery log comes from `nvme discover -o json`, which needs no secret (nvmet authenticates
only on the disks' subsystems; with TLS the discovery key is in the keyring first).

ipaddress and subprocess are imported where used: `storagetm copy` needs only the sysfs
half, and starts sooner without them. The values are NamedTuples, not dataclasses, for the
same reason (importing dataclasses and making a class of it took a quarter of the helper's
start-up, measured on the host).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from storagetm.errors import StorageTMError, UsageError
from storagetm.protocol import DISCOVERY_NQN, UUID_NQN_PREFIX

FABRICS = Path("/dev/nvme-fabrics")
SYS = Path("/sys")
ANCHOR_SUFFIX = ":discovery-port"  # the subsystem a storagetm target links into 8009 only; no host may use it
KEEP_ALIVE_TMO = 30
# Without a path I/O waits ctrl_loss_tmo (600 s) before failing; the copy should say so
# sooner. The controller keeps reconnecting meanwhile (ctrl_loss_tmo -1: for ever), so a
# target back again serves the resumed copy under the same device.
FAST_IO_FAIL_TMO = 10
CTRL_LOSS_TMO = -1

if TYPE_CHECKING:
    import subprocess

    Runner: TypeAlias = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


class FabricsError(StorageTMError):
    pass


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    import subprocess

    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"storagetm {command} needs root (it connects NVMe devices)",
                         hint=f"run it with sudo: sudo storagetm {command} …")  # fmt: skip


def require_nvme_cli() -> str:
    path = shutil.which("nvme")
    if path is None:
        raise FabricsError("nvme-cli is not installed", hint="install it: apt install nvme-cli, dnf install nvme-cli")
    return path


def require_nvme_tcp(sys_root: Path = SYS, runner: Runner = run) -> None:
    """The kernel's NVMe/TCP initiator, loaded if it is a module."""
    if (sys_root / "module/nvme_tcp").exists():
        return
    result = runner(["modprobe", "nvme-tcp"])
    if result.returncode != 0 or not (sys_root / "module/nvme_tcp").exists():
        raise FabricsError(f"the kernel has no nvme-tcp module: {result.stderr.strip() or 'modprobe failed'}",
                           hint="install your distribution's kernel modules package (CONFIG_NVME_TCP)")  # fmt: skip


class Endpoint(NamedTuple):
    """Where to reach a target: an address and, for link-local IPv6, the local interface."""

    address: str
    port: int
    interface: str = ""

    @property
    def traddr(self) -> str:
        return f"{self.address}%{self.interface}" if self.interface else self.address

    def __str__(self) -> str:
        return f"[{self.traddr}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


class Record(NamedTuple):
    """One subsystem in a discovery log page."""

    nqn: str
    port: int
    tls: bool


class Credentials(NamedTuple):
    host_nqn: str = ""
    secret: str = ""
    ctrl_secret: str = ""
    tls: bool = False

    @property
    def host_id(self) -> str:
        """nvme-cli's choice too: the UUID of a uuid-form host NQN (the kernel refuses one
        host NQN under two host ids)."""
        return self.host_nqn.removeprefix(UUID_NQN_PREFIX) if self.host_nqn.startswith(UUID_NQN_PREFIX) else ""


def link_local(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.version == 6 and ip.is_link_local


def up_interfaces_with_link_local(proc_inet6: Path = Path("/proc/net/if_inet6"), sys_root: Path = SYS) -> list[str]:
    """Interfaces that are up and hold an fe80:: address: the ones a link-local target may be on."""
    try:
        lines = proc_inet6.read_text().splitlines()
    except OSError:
        return []
    names: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not fields[0].startswith("fe80") or fields[5] == "lo":
            continue
        try:
            state = (sys_root / "class/net" / fields[5] / "operstate").read_text().strip()
        except OSError:
            state = "unknown"
        if state in ("up", "unknown") and fields[5] not in names:
            names.append(fields[5])
    return names


def endpoints(address: str, port: int, interfaces: Callable[[], list[str]] = up_interfaces_with_link_local,
              ) -> list[Endpoint]:  # fmt: skip
    """The ways to try an address: a link-local one through each up interface in turn."""
    if link_local(address):
        return [Endpoint(address, port, name) for name in interfaces()]
    return [Endpoint(address, port)]


def parse_discovery(text: str) -> tuple[list[Record], list[int]]:
    """(subsystems, referred ports) of `nvme discover -o json` output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise FabricsError("nvme discover printed no JSON log page", hint="use nvme-cli 2.x") from None
    records: list[Record] = []
    referrals: list[int] = []
    for entry in data.get("records", []) if isinstance(data, dict) else []:
        subtype, nqn = str(entry.get("subtype", "")), str(entry.get("subnqn", ""))
        port = int(str(entry.get("trsvcid", "0")).strip() or 0)
        if "referral" in subtype:
            referrals.append(port)
        elif subtype.startswith("nvme") and nqn != DISCOVERY_NQN and not nqn.endswith(ANCHOR_SUFFIX):
            records.append(Record(nqn, port, "tls" in str(entry.get("sectype", "")).lower()))
    return records, referrals


def discover(endpoint: Endpoint, creds: Credentials, runner: Runner = run) -> list[Record]:
    """The target's subsystems, following its referrals once (a storagetm target's 8009
    refers to its I/O port). FabricsError if the endpoint does not answer."""
    records, referrals = _discover_once(endpoint, creds, runner)
    for port in referrals:
        if port != endpoint.port:
            with_referred, _ = _discover_once(endpoint._replace(port=port), creds, runner)
            records += [r for r in with_referred if r not in records]
    return records


def _discover_once(endpoint: Endpoint, creds: Credentials, runner: Runner) -> tuple[list[Record], list[int]]:
    argv = ["nvme", "discover", "-t", "tcp", "-a", endpoint.traddr, "-s", str(endpoint.port), "-o", "json"]
    if endpoint.interface:
        argv += ["-f", endpoint.interface]
    if creds.host_nqn:
        argv += [f"--hostnqn={creds.host_nqn}"] + ([f"--hostid={creds.host_id}"] if creds.host_id else [])
    if creds.tls:
        argv.append("--tls")
    result = runner(argv)
    if result.returncode != 0:
        raise FabricsError(f"no answer from {endpoint}: {result.stderr.strip().splitlines()[-1:] or ['failed']}"[:300])
    return parse_discovery(result.stdout)


def connect_options(endpoint: Endpoint, nqn: str, creds: Credentials) -> str:
    """The line /dev/nvme-fabrics takes (drivers/nvme/host/fabrics.c's option tokens)."""
    for value in (endpoint.traddr, nqn, creds.host_nqn):
        if any(c in value for c in ",=\n") or any(c.isspace() for c in value):
            # The kernel splits at commas, a later option winning: a value must stay one option.
            raise FabricsError(f"{value!r} cannot be passed to the kernel (a comma, = or space in it)",
                               hint="is this a storagetm target? its names never hold one")  # fmt: skip
    options = [f"transport=tcp,traddr={endpoint.traddr},trsvcid={endpoint.port},nqn={nqn}"]
    if endpoint.interface:
        options.append(f"host_iface={endpoint.interface}")
    if creds.host_nqn:
        options.append(f"hostnqn={creds.host_nqn}")
    if creds.host_id:
        options.append(f"hostid={creds.host_id}")
    options.append(f"keep_alive_tmo={KEEP_ALIVE_TMO},ctrl_loss_tmo={CTRL_LOSS_TMO},fast_io_fail_tmo={FAST_IO_FAIL_TMO}")
    if creds.secret:
        options.append(f"dhchap_secret={creds.secret}")
    if creds.ctrl_secret:
        options.append(f"dhchap_ctrl_secret={creds.ctrl_secret}")
    if creds.tls:
        options.append("tls")
    return ",".join(options)


REFUSALS = {
    errno.EKEYREJECTED: "the target refused the key: the connection code is wrong or from an earlier start",
    errno.EACCES: "the target refused this host: the connection code is wrong or from an earlier start",
    errno.EPERM: "the target refused this host: the connection code is wrong or from an earlier start",
    errno.ENOKEY: "no TLS key for it in the kernel keyring (is tlshd running? is the code from the target's "
                  "current start?)",
    errno.ECONNREFUSED: "nothing listens there (is storagetm running on the target?)",
    errno.EHOSTUNREACH: "the address is unreachable from here",
    errno.ENETUNREACH: "the address is unreachable from here (wrong interface?)",
    errno.ETIMEDOUT: "the target does not answer",
}


def connect(endpoint: Endpoint, nqn: str, creds: Credentials, fabrics: Path = FABRICS) -> str:
    """Connect one subsystem; its controller's name (nvmeN)."""
    try:
        fd = os.open(fabrics, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FabricsError(f"{fabrics} is missing", hint="load nvme-fabrics: modprobe nvme-tcp") from None
    try:
        os.write(fd, connect_options(endpoint, nqn, creds).encode())
        answer = os.read(fd, 4096).decode()
    except OSError as exc:
        why = REFUSALS.get(exc.errno or 0, exc.strerror or str(exc))
        raise FabricsError(f"cannot connect {nqn} at {endpoint}: {why}") from None
    finally:
        os.close(fd)
    fields = dict(item.split("=", 1) for item in answer.strip().split(",") if "=" in item)
    return f"nvme{fields.get('instance', '?')}"


class Namespace(NamedTuple):
    nqn: str
    device: str  # /dev/nvmeXnY
    model: str
    serial: str
    size: int  # bytes
    controllers: tuple[str, ...]  # nvmeN


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def connected(sys_root: Path = SYS) -> list[Namespace]:
    """Every namespace of every connected NVMe-oF subsystem, as sysfs shows it."""
    found: list[Namespace] = []
    for subsystem in sorted((sys_root / "class/nvme-subsystem").glob("nvme-subsys*")):
        nqn = _read(subsystem / "subsysnqn")
        if not nqn or nqn == DISCOVERY_NQN:
            continue
        controllers = tuple(sorted(p.name for p in subsystem.glob("nvme*") if p.name[4:].isdigit()))
        for block in sorted(subsystem.glob("nvme*n*")):
            if "c" in block.name[4:]:  # nvme0c1n1: a path, not the device
                continue
            sectors = _read(block / "size")
            found.append(Namespace(nqn, f"/dev/{block.name}", _read(subsystem / "model"), _read(subsystem / "serial"),
                                   int(sectors or 0) * 512, controllers))  # fmt: skip
    return found


def controllers(nqn: str, sys_root: Path = SYS) -> list[tuple[str, str]]:
    """(name, state) of each controller connected to subsystem `nqn`: "live", or
    "connecting" while the kernel tries to reach a target that went away."""
    return [(ctrl.name, _read(ctrl / "state")) for ctrl in sorted((sys_root / "class/nvme").glob("nvme*"))
            if _read(ctrl / "subsysnqn") == nqn]  # fmt: skip


def wait_namespaces(nqns: Sequence[str], timeout: float = 15, sys_root: Path = SYS) -> list[Namespace]:
    """The namespaces of `nqns` once the kernel's scan shows one for each (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        ours = [ns for ns in connected(sys_root) if ns.nqn in nqns]
        if {ns.nqn for ns in ours} >= set(nqns) or time.monotonic() > deadline:
            return ours
        time.sleep(0.2)


def controller_nqn(name: str, sys_root: Path = SYS) -> str:
    """The subsystem NQN a controller (nvmeN) is connected to; "" if it is gone."""
    return _read(sys_root / "class/nvme" / name / "subsysnqn")


def delete_controller(name: str, sys_root: Path = SYS) -> None:
    try:
        (sys_root / "class/nvme" / name / "delete_controller").write_text("1")
    except FileNotFoundError:
        pass  # gone already
    except OSError as exc:
        raise FabricsError(f"cannot disconnect {name}: {exc.strerror or exc}") from None
