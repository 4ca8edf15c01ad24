"""The reconciler: turns "these disks should be exported" into nvmet configfs state.

Start-up, hotplug, adoption after a crash and teardown all go through `apply()`:
desired exports are compared with what storagetm owns in configfs and only the
difference is changed. Objects storagetm did not make are never touched.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from storagetm import modes
from storagetm.auth import AuthConfig
from storagetm.configfs import Port, Root, Subsystem
from storagetm.disks import Disk
from storagetm.errors import ConfigfsError, StorageTMError
from storagetm.identity import Identity
from storagetm.tls import TLSConfig, insert_key

log = logging.getLogger(__name__)

NSID = 1
DISCOVERY_TRSVCID = 8009
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"  # the well-known one every port serves
IO_TRSVCID = 4420


@dataclass(frozen=True)
class Export:
    """One disk to export, with the identity the initiator will see."""

    disk: Disk
    identity: Identity
    mode: modes.Mode = modes.Mode.READ_WRITE
    snapshot_size: int = 0  # copy-on-write store limit in snapshot mode; 0: the default, as RAM allows

    @property
    def nqn(self) -> str:
        return self.identity.nqn


@dataclass(frozen=True)
class Listener:
    """One nvmet port: a TCP address family and service id."""

    adrfam: str  # "ipv4" or "ipv6"
    traddr: str  # wildcard: "0.0.0.0" or "::"
    trsvcid: int


def listeners(io_port: int, ipv6: bool) -> list[Listener]:
    """The ports to open. An IPv6 wildcard port also accepts IPv4 (dual-stack socket),
    and an IPv4 and an IPv6 wildcard on the same TCP port cannot both bind."""
    adrfam, traddr = ("ipv6", "::") if ipv6 else ("ipv4", "0.0.0.0")
    ports = [Listener(adrfam, traddr, io_port)]
    if io_port != DISCOVERY_TRSVCID:
        ports.append(Listener(adrfam, traddr, DISCOVERY_TRSVCID))
    return ports


class ExportError(StorageTMError):
    pass


@dataclass
class _Held:
    export: Export
    fd: int | None = None
    backing: modes.Backing | None = None


@dataclass
class Exporter:
    """Owns a set of subsystems and ports in configfs and keeps them as desired."""

    root: Root
    owned_subsystems: dict[str, _Held] = field(default_factory=dict)
    owned_ports: dict[int, Listener] = field(default_factory=dict)
    auth: AuthConfig = field(default_factory=AuthConfig)
    owned_hosts: set[str] = field(default_factory=set)
    tls: TLSConfig = field(default_factory=TLSConfig)
    insert_tls_key: Callable[[str, str, str], None] = insert_key
    system: modes.System = field(default_factory=modes.System)

    # ---- TLS -----------------------------------------------------------------

    def setup_tls(self, config: TLSConfig) -> None:
        """Ports created from now on require TLS; each host gets the discovery key now and
        a key for each subsystem as it is exported."""
        self.tls = config
        for hostnqn in config.hosts:
            self.insert_tls_key(hostnqn, DISCOVERY_NQN, config.key)

    # ---- hosts (authentication) ----------------------------------------------

    def setup_hosts(self, auth: AuthConfig, adopt: set[str] | None = None) -> None:
        """Create a configfs host with the DH-HMAC-CHAP secrets for each allowed host NQN."""
        self.auth = auth
        for hostnqn in auth.hosts:
            host = self.root.host(hostnqn)
            if host.exists() and hostnqn not in (adopt or set()) and hostnqn not in self.owned_hosts:
                raise ExportError(f"host {hostnqn} is already configured in nvmet by another program",
                                  hint="remove it, or allow a different host NQN")  # fmt: skip
            if not host.exists():
                self.root.create_host(hostnqn)
            self.owned_hosts.add(hostnqn)
            host.set("dhchap", "key", auth.secret)
            if auth.ctrl_secret:
                host.set("dhchap", "ctrl_key", auth.ctrl_secret)

    def remove_hosts(self) -> None:
        _best_effort(self.root.host(hostnqn).delete for hostnqn in sorted(self.owned_hosts))
        self.owned_hosts.clear()

    # ---- ports ---------------------------------------------------------------

    def open_ports(self, wanted: list[Listener], adopt: Mapping[int, Listener] | None = None) -> None:
        """Create the ports (they start listening once a subsystem is linked)."""
        for port_id, listener in (adopt or {}).items():
            port = self.root.port(port_id)
            if port.exists() and self._port_matches(port, listener) and listener in wanted:
                self.owned_ports[port_id] = listener
        for listener in wanted:
            if listener in self.owned_ports.values():
                continue
            port_id = self.root.free_port_id(listener.trsvcid)
            port = self.root.create_port(port_id)
            try:
                port.set("addr", "trtype", "tcp")
                port.set("addr", "adrfam", listener.adrfam)
                port.set("addr", "traddr", listener.traddr)
                port.set("addr", "trsvcid", str(listener.trsvcid))
                if self.tls.enabled:
                    port.set("addr", "tsas", "tls1.3")  # also makes TLS required (addr_treq)
            except StorageTMError:
                port.delete()
                raise
            self.owned_ports[port_id] = listener

    def _port_matches(self, port: Port, listener: Listener) -> bool:
        try:
            return (
                port.get("addr", "adrfam") == listener.adrfam
                and port.get("addr", "traddr") == listener.traddr
                and port.get("addr", "trsvcid") == str(listener.trsvcid)
                and (port.get("addr", "tsas") == "tls1.3") == self.tls.enabled
            )
        except ConfigfsError:
            return False

    def close_ports(self) -> None:
        _best_effort(self.root.port(port_id).delete for port_id in sorted(self.owned_ports))
        self.owned_ports.clear()

    # ---- subsystems ----------------------------------------------------------

    @property
    def exports(self) -> dict[str, Export]:
        return {nqn: held.export for nqn, held in self.owned_subsystems.items()}

    @property
    def backings(self) -> dict[str, modes.Backing]:
        return {nqn: held.backing for nqn, held in self.owned_subsystems.items() if held.backing is not None}

    def adopt(self, previous: Mapping[str, Export], backings: Mapping[str, modes.Backing] | None = None) -> None:
        """Take over exports a previous storagetm instance left in configfs."""
        for nqn, export in previous.items():
            subsystem = self.root.subsystem(nqn)
            if not subsystem.exists():
                continue
            backing = (backings or {}).get(nqn, modes.Backing(export.disk.devnode))
            self.owned_subsystems[nqn] = _Held(export, _lock(export.disk), backing)
            log.info("adopted %s (%s)", nqn, export.disk.devnode)

    def apply(self, desired: Mapping[str, Export]) -> list[ExportError]:
        """Make configfs match `desired`; return the errors of exports that failed."""
        errors: list[ExportError] = []
        for nqn in sorted(set(self.owned_subsystems) - set(desired)):
            self.withdraw(nqn)
        for nqn, export in sorted(desired.items()):
            held = self.owned_subsystems.get(nqn)
            try:
                if held is None:
                    self._export(export)
                elif held.export.disk.devnode != export.disk.devnode or held.export.mode != export.mode:
                    self.withdraw(nqn)
                    self._export(export)
                else:
                    self._refresh(held, export)
            except StorageTMError as exc:
                errors.append(ExportError(f"{export.disk.devnode}: {exc.message}", exc.hint))
        return errors

    def _export(self, export: Export) -> None:
        """Configure or roll back: a half-made export is removed before the error propagates."""
        identity = export.identity
        fd = _lock(export.disk)
        subsystem: Subsystem | None = None
        backing: modes.Backing | None = None
        try:
            backing = modes.prepare(export.disk.devnode, export.disk.size, export.mode, identity.nqn,
                                    export.snapshot_size, self.system)  # fmt: skip
            subsystem = self.root.create_subsystem(identity.nqn)
            subsystem.set("attr", "allow_any_host", "0" if self.auth.enabled else "1")
            for hostnqn in self.auth.hosts:
                subsystem.allow_host(self.root.host(hostnqn))
            for hostnqn in self.tls.hosts:
                self.insert_tls_key(hostnqn, identity.nqn, self.tls.key)
            for name, value in (("model", identity.model), ("serial", identity.serial),
                                ("firmware", identity.firmware)):  # fmt: skip
                if value:
                    subsystem.set("attr", name, value)
            namespace = subsystem.create_namespace(NSID)
            namespace.set("device", "path", backing.path)
            namespace.set("device", "uuid", identity.uuid)
            namespace.set("device", "nguid", identity.nguid)
            namespace.enable()
            for port_id in self._discovery_ports_first():
                self.root.port(port_id).link(subsystem)
        except StorageTMError:
            for port_id in sorted(self.owned_ports):
                self.root.port(port_id).unlink(identity.nqn)
            if subsystem is not None:
                subsystem.delete()
            if backing is not None:
                try:
                    modes.release(backing, self.system)
                except modes.BackingError as exc:
                    log.warning("%s, ignoring", exc.one_line())
            _unlock(fd)
            raise
        self.owned_subsystems[identity.nqn] = _Held(export, fd, backing)
        log.info("exported %s (%s) as %s", export.disk.devnode, export.mode.label, identity.nqn)

    def _discovery_ports_first(self) -> list[int]:
        """Initiators watching a discovery port (its log-change event) connect as soon as
        they hear of a disk, through that port: link it there first."""
        return sorted(self.owned_ports, key=lambda port_id: (self.owned_ports[port_id].trsvcid != DISCOVERY_TRSVCID,
                                                             port_id))  # fmt: skip

    def _refresh(self, held: _Held, export: Export) -> None:
        """Propagate a size change of an exported disk to the initiators."""
        if held.export.disk.size != export.disk.size and export.mode is not modes.Mode.READ_WRITE:
            log.warning("%s changed size; its %s export keeps the old size", export.disk.devnode, export.mode.label)
        elif held.export.disk.size != export.disk.size:
            self.root.subsystem(export.nqn).namespace(NSID).revalidate()
            log.info("%s changed size: %d -> %d bytes", export.disk.devnode, held.export.disk.size,
                     export.disk.size)  # fmt: skip
        held.export = export

    def withdraw(self, nqn: str) -> None:
        """Tear one export down: disable and remove the namespace, unlink, remove."""
        held = self.owned_subsystems.pop(nqn, None)
        subsystem = self.root.subsystem(nqn)
        steps: list[Callable[[], None]] = []
        if subsystem.exists():
            steps += [ns.delete for ns in subsystem.namespaces()]
        steps += [functools.partial(self.root.port(port_id).unlink, nqn) for port_id in sorted(self.owned_ports)]
        steps.append(subsystem.delete)
        _best_effort(steps)
        if held is not None:
            if held.backing is not None:
                try:
                    modes.release(held.backing, self.system)
                except modes.BackingError as exc:
                    log.warning("%s, ignoring", exc.one_line())
            _unlock(held.fd)
            log.info("withdrew %s (%s)", nqn, held.export.disk.devnode)

    def teardown(self) -> None:
        for nqn in sorted(self.owned_subsystems):
            self.withdraw(nqn)
        self.close_ports()
        self.remove_hosts()


def _best_effort(steps: Iterable[Callable[[], None]]) -> None:
    """Teardown goes on past errors, as upstream's does: each is logged as "…, ignoring"."""
    for step in steps:
        try:
            step()
        except ConfigfsError as exc:
            log.warning("%s, ignoring", exc.one_line())


def _lock(disk: Disk) -> int | None:
    """Hold a shared BSD lock on the device while it is exported: partitioning tools that
    take the exclusive lock fail, while udev (which takes a shared one) still probes and
    reports size changes. Files are not locked."""
    if disk.is_file:
        return None
    try:
        fd = os.open(disk.devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ExportError(f"cannot open {disk.devnode}: {exc.strerror}", hint="is the device still there?") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise ExportError(f"cannot lock {disk.devnode}: {exc.strerror}") from exc
        log.warning("%s is locked by another program; exporting it anyway", disk.devnode)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
