"""NVMe/TCP through the kernel's nvmet: the objects an export needs, and their drivers.

Per export: a subsystem, its namespace on the backing device, an allowed-host link per
host (authentication), a TLS PSK per host (TLS), and a link into the I/O port. Shared:
the hosts, the I/O port, and port 8009 for discovery only: nvmet's discovery log gives
each entry the port the host asked on, so a subsystem linked into 8009 would do its I/O
there. 8009 instead listens on each of the target's addresses by itself, each holding one
subsystem no host may use (a port listens only once one is linked) and a referral to the
I/O port's discovery service at that same address: an initiator that reached the target
at an address is referred to that address, whichever networks either machine has.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence

from msgspec import Struct, field

from storagetm.fabrics.nvmet.configfs import Root
from storagetm.model import DISCOVERY_NQN, NSID, Device, Export, Listener, Want
from storagetm.reconcile.objects import BaseDriver, Driver, Facts, FactsOf, Obj, make
from storagetm.security.tls import Keyring, insert_key, psk_identity

HOST, PORT, SUBSYSTEM, NAMESPACE = "nvmet-host", "nvmet-port", "nvmet-subsystem", "nvmet-namespace"
ALLOWED_HOST, PORT_LINK, REFERRAL, PSK = "nvmet-allowed-host", "nvmet-port-link", "nvmet-referral", "tls-psk"
REFERRAL_NAME = "storagetm"
DISCOVERY_IDS = range(10000, 60000)  # nvmet port ids are 16 bits


def discovery_group(listener: Listener) -> str:
    return f"discovery {listener.traddr}"


def anchor_nqn(nqn_base: str) -> str:
    """The subsystem that makes the discovery port listen; no host may use it."""
    return f"{nqn_base}:discovery-port"


def port_ids(listeners: Sequence[Listener], io_port: int) -> list[str]:
    """Each port's configfs id, known before it is made so that a make cut short is found:
    the I/O port's is its TCP port; a discovery port's is drawn from its address (stable
    while the address stays), away from the I/O port's and the others'. Colliding addresses
    are settled in address order, so the ids do not depend on the order of `listeners`."""
    taken, ids = {io_port}, [""] * len(listeners)
    for index in sorted(range(len(listeners)), key=lambda i: listeners[i].traddr):
        number = DISCOVERY_IDS.start + zlib.crc32(listeners[index].traddr.encode()) % len(DISCOVERY_IDS)
        while number in taken:
            number = number + 1 if number + 1 in DISCOVERY_IDS else DISCOVERY_IDS.start
        taken.add(number)
        ids[index] = str(number)
    return ids


def port_obj(port_id: str, listener: Listener, tls: bool, group: str = "") -> Obj:
    return make(PORT, port_id, {"trtype": "tcp", "adrfam": listener.adrfam, "traddr": listener.traddr,
                                "trsvcid": str(listener.trsvcid), "tsas": "tls1.3" if tls else ""},
                group=group)  # fmt: skip


def referred_address(listener: Listener) -> str:
    """A discovery log entry carries no zone: the initiator names its own interface."""
    return listener.traddr.partition("%")[0]


class NvmetFabric(Struct, frozen=True):
    root: Root
    keyring: Keyring = field(default_factory=Keyring)
    name: str = "nvmet"

    def objects(self, want: Want, devices: Mapping[str, Device]) -> list[Obj]:
        if not want.listen:
            return []
        io = port_obj(str(want.io_port), want.io_listener, want.tls.enabled)
        objs = [io]
        for hostnqn in want.auth.hosts:
            attrs = {"dhchap_key": want.auth.secret, "dhchap_ctrl_key": want.auth.ctrl_secret}
            objs.append(make(HOST, hostnqn, attrs, secret=("dhchap_key", "dhchap_ctrl_key")))
        objs += self._listening(want, io)
        for hostnqn in want.tls.hosts:
            objs.append(_psk(want.tls.key, hostnqn, DISCOVERY_NQN, ""))
        for nqn, export in sorted(want.exports.items()):
            objs += self._export(want, nqn, export, devices[nqn], io)
        return objs

    def _listening(self, want: Want, io: Obj) -> list[Obj]:
        """Every port listens from the start, before any disk is exported (a watching
        initiator's discovery controller waits there): each holds the anchor subsystem.
        Each discovery port is a group of its own: one whose address cannot be bound (gone
        again) fails alone."""
        anchor = make(SUBSYSTEM, anchor_nqn(want.nqn_base), {"allow_any_host": "0"})
        objs = [anchor, make(PORT_LINK, f"{io.name} {anchor.name}", needs=(io.key, anchor.key))]
        listeners = want.discovery_listeners
        for port_id, listener in zip(port_ids(listeners, want.io_port), listeners, strict=True):
            group = discovery_group(listener)
            port = port_obj(port_id, listener, want.tls.enabled, group)
            objs += [port,
                     make(PORT_LINK, f"{port.name} {anchor.name}", needs=(port.key, anchor.key), group=group),
                     make(REFERRAL, f"{port.name} {REFERRAL_NAME}", {
                         "trtype": "tcp", "adrfam": listener.adrfam, "traddr": referred_address(listener),
                         "trsvcid": str(want.io_port), "portid": io.name,
                         "treq": "required" if want.tls.enabled else "not specified"},
                         needs=(port.key, io.key), group=group)]  # fmt: skip
        return objs

    def _export(self, want: Want, nqn: str, export: Export, device: Device, io: Obj) -> list[Obj]:
        identity = export.identity
        subsystem = make(SUBSYSTEM, nqn, {"allow_any_host": "0" if want.auth.enabled else "1",
                                          "model": identity.model, "serial": identity.serial,
                                          "firmware": identity.firmware}, group=nqn)  # fmt: skip
        namespace = make(NAMESPACE, nqn, {"device_path": device.path, "device_uuid": identity.uuid,
                                          "device_nguid": identity.nguid, "size": str(export.disk.size)},
                         needs=(subsystem.key, *([device.made_by] if device.made_by else [])), group=nqn)  # fmt: skip
        objs = [subsystem, namespace]
        objs += [make(ALLOWED_HOST, f"{nqn} {host}", needs=(subsystem.key, (HOST, host)), group=nqn)
                 for host in want.auth.hosts]  # fmt: skip
        objs += [_psk(want.tls.key, host, nqn, nqn) for host in want.tls.hosts]
        # Linked last: an initiator watching the discovery log connects as soon as it is
        # linked, and must find the namespace, its host and its key in place.
        objs.append(make(PORT_LINK, f"{io.name} {nqn}", needs=(io.key, *(o.key for o in objs)), group=nqn))
        return objs

    def drivers(self) -> Sequence[Driver]:
        root = self.root
        return (HostDriver(root), PortDriver(root), SubsystemDriver(root), NamespaceDriver(root),
                AllowedHostDriver(root), PortLinkDriver(root), ReferralDriver(root),
                PskDriver(self.keyring))  # fmt: skip


def _psk(key: str, hostnqn: str, subnqn: str, group: str) -> Obj:
    # The name only: the key itself is derived when the object is made, not on every plan.
    return make(PSK, psk_identity(key, hostnqn, subnqn), {"key": key, "host": hostnqn, "subsystem": subnqn},
                group=group, secret=("key",))


def _pair(obj: Obj) -> tuple[str, str]:
    """`PORT NQN` / `NQN HOST`: the two names a link object joins."""
    first, _, second = obj.name.partition(" ")
    return first, second


class HostDriver(BaseDriver):
    kind, rank = HOST, 20
    mutable = frozenset({"dhchap_key"})

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.host(obj.name).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        host = self.root.create_host(obj.name)
        try:
            self._keys(obj, {"dhchap_key", "dhchap_ctrl_key"})
        except BaseException:
            host.delete()
            raise
        return {}

    def _keys(self, obj: Obj, names: set[str]) -> None:
        host = self.root.host(obj.name)
        for name in sorted(names):
            if obj.attr(name):
                host.set("dhchap", name.removeprefix("dhchap_"), obj.attr(name))

    def update(self, obj: Obj, facts: Facts, changed: frozenset[str]) -> Facts:
        self._keys(obj, set(changed))
        return facts

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.host(obj.name).delete()


class PortDriver(BaseDriver):
    kind, rank = PORT, 30

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.port(int(obj.name)).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        port = self.root.create_port(int(obj.name))
        try:
            for name in ("trtype", "adrfam", "traddr", "trsvcid", "tsas"):  # tsas after trtype, which resets it
                if obj.attr(name):
                    port.set("addr", name, obj.attr(name))  # tls1.3 also makes TLS required (addr_treq)
        except BaseException:
            port.delete()
            raise
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        port = self.root.port(int(obj.name))
        if port.exists():
            port.remove()


class SubsystemDriver(BaseDriver):
    kind, rank = SUBSYSTEM, 40
    mutable = frozenset({"allow_any_host"})

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.subsystem(obj.name).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        subsystem = self.root.create_subsystem(obj.name)
        try:
            for name in ("allow_any_host", "model", "serial", "firmware"):
                if obj.attr(name):
                    subsystem.set("attr", name, obj.attr(name))
        except BaseException:
            subsystem.remove()
            raise
        return {}

    def update(self, obj: Obj, facts: Facts, changed: frozenset[str]) -> Facts:
        self.root.subsystem(obj.name).set("attr", "allow_any_host", obj.attr("allow_any_host"))
        return facts

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.subsystem(obj.name).remove()


class NamespaceDriver(BaseDriver):
    kind, rank = NAMESPACE, 50
    mutable = frozenset({"size"})

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.subsystem(obj.name).namespace(NSID).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        namespace = self.root.subsystem(obj.name).create_namespace(NSID)
        try:
            namespace.set("device", "path", obj.attr("device_path"))
            namespace.set("device", "uuid", obj.attr("device_uuid"))
            namespace.set("device", "nguid", obj.attr("device_nguid"))
            namespace.enable()
        except BaseException:
            namespace.delete()
            raise
        return {}

    def update(self, obj: Obj, facts: Facts, changed: frozenset[str]) -> Facts:
        self.root.subsystem(obj.name).namespace(NSID).revalidate()  # tells connected hosts the new size
        return facts

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.subsystem(obj.name).namespace(NSID).delete()


class AllowedHostDriver(BaseDriver):
    kind, rank = ALLOWED_HOST, 60

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        nqn, host = _pair(obj)
        return os.path.islink(f"{self.root.subsystem(nqn).path}/allowed_hosts/{host}")

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        nqn, host = _pair(obj)
        self.root.subsystem(nqn).allow_host(self.root.host(host))
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        nqn, host = _pair(obj)
        self.root.subsystem(nqn).disallow_host(host)


class PortLinkDriver(BaseDriver):
    kind, rank = PORT_LINK, 70

    def __init__(self, root: Root) -> None:
        self.root = root

    def present(self, obj: Obj, facts: Facts) -> bool:
        port, nqn = _pair(obj)
        return os.path.islink(f"{self.root.port(int(port)).path}/subsystems/{nqn}")

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        port, nqn = _pair(obj)
        self.root.port(int(port)).link(self.root.subsystem(nqn))
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        port, nqn = _pair(obj)
        self.root.port(int(port)).unlink(nqn)


class ReferralDriver(BaseDriver):
    kind, rank = REFERRAL, 75

    def __init__(self, root: Root) -> None:
        self.root = root

    def _referral(self, obj: Obj) -> str:
        port, name = _pair(obj)
        return f"{self.root.port(int(port)).path}/referrals/{name}"

    def present(self, obj: Obj, facts: Facts) -> bool:
        return os.path.isdir(self._referral(obj))

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        port, name = _pair(obj)
        referral = self.root.port(int(port)).create_referral(name)
        try:
            for attr in ("trtype", "adrfam", "traddr", "trsvcid", "portid", "treq"):  # trtype first: it resets others
                referral.set("addr", attr, obj.attr(attr))
            referral.enable()
        except BaseException:
            referral.delete()
            raise
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        port, name = _pair(obj)
        self.root.port(int(port)).referral(name).delete()


class PskDriver(BaseDriver):
    """A TLS PSK in the kernel's .nvme keyring, for one (host, subsystem) pair."""

    kind, rank = PSK, 10

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.keyring.find(obj.name)

    def foreign(self, obj: Obj) -> bool:
        return False  # a key of that description is the same pair's: replaced, not refused

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        insert_key(obj.attr("host"), obj.attr("subsystem"), obj.attr("key"), self.keyring)
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.keyring.revoke(obj.name)
