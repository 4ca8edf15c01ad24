"""A typed model of the kernel's nvmet configfs tree (/sys/kernel/config/nvmet).

Each node knows its path; attributes are files named `<group>_<name>`
(`attr_model`, `device_path`, `addr_traddr`). The file operations and the node base are
shared with LIO's tree (storagetm.fabrics.configfs).
"""

from __future__ import annotations

import os

from storagetm.errors import ConfigfsError
from storagetm.fabrics.configfs import ConfigfsNode, ConfigfsOps, OsOps, describe
from storagetm.fabrics.configfs import basename as _basename

NVMET_ROOT = "/sys/kernel/config/nvmet"
# Attributes whose values never go into an error message (journal, console).
SECRET_ATTRIBUTES = frozenset({"dhchap_key", "dhchap_ctrl_key"})


class Node(ConfigfsNode):
    """One nvmet directory: its attributes are files named `<group>_<name>`."""

    def get(self, group: str, name: str) -> str:
        return self._read(f"{group}_{name}")

    def set(self, group: str, name: str, value: str) -> None:
        attribute = f"{group}_{name}"
        self._write(attribute, value, secret=attribute in SECRET_ATTRIBUTES)


class Namespace(Node):
    @property
    def nsid(self) -> int:
        return int(self.name)

    @property
    def enabled(self) -> bool:
        return self.ops.read(f"{self.path}/enable").strip() == "1"

    def enable(self, on: bool = True) -> None:
        try:
            self.ops.write(f"{self.path}/enable", "1" if on else "0")
        except OSError as exc:
            verb = "enable" if on else "disable"
            raise ConfigfsError(f"cannot {verb} namespace {self.path}: {describe(exc)}") from exc

    def revalidate(self) -> None:
        """Have the target re-read the backing device's size and tell connected hosts."""
        try:
            self.ops.write(f"{self.path}/revalidate_size", "1")
        except OSError as exc:
            raise ConfigfsError(f"cannot update the size of namespace {self.path}: {describe(exc)}") from exc

    def delete(self) -> None:
        if not self.exists():
            return
        if self.enabled:
            self.enable(False)
        self._rmdir()


class Host(Node):
    def delete(self) -> None:
        self._rmdir()


class Subsystem(Node):
    @property
    def nqn(self) -> str:
        return self.name

    def namespace(self, nsid: int) -> Namespace:
        return Namespace(f"{self.path}/namespaces/{nsid}", self.ops)

    def namespaces(self) -> list[Namespace]:
        return [Namespace(p, self.ops) for p in self._children("namespaces")]

    def create_namespace(self, nsid: int) -> Namespace:
        ns = self.namespace(nsid)
        ns._mkdir()
        return ns

    def allow_host(self, host: Host) -> None:
        try:
            self.ops.symlink(host.path, f"{self.path}/allowed_hosts/{host.name}")
        except FileExistsError:
            pass  # allowed already
        except OSError as exc:
            raise ConfigfsError(f"cannot allow host {host.name} on {self.nqn}: {describe(exc)}") from exc

    def disallow_host(self, hostnqn: str) -> None:
        self._unlink(f"allowed_hosts/{hostnqn}")

    def remove(self) -> None:
        """Remove the subsystem itself (its namespaces and links must be gone)."""
        self._rmdir()

    def allowed_hosts(self) -> list[str]:
        return [_basename(p) for p in self._children("allowed_hosts")]

    def delete(self) -> None:
        """Remove namespaces, then host links, then the subsystem itself."""
        if not self.exists():
            return
        for ns in self.namespaces():
            ns.delete()
        for link in self._children("allowed_hosts"):
            self.ops.unlink(link)
        self._rmdir()


class Referral(Node):
    """A discovery log entry pointing at another discovery service. Its attributes can be
    written only while it is disabled."""

    def enable(self, on: bool = True) -> None:
        try:
            self.ops.write(f"{self.path}/enable", "1" if on else "0")
        except OSError as exc:
            verb = "enable" if on else "disable"
            raise ConfigfsError(f"cannot {verb} referral {self.path}: {describe(exc)}") from exc

    def delete(self) -> None:
        if not self.exists():
            return
        self.enable(False)
        self._rmdir()


class Port(Node):
    @property
    def port_id(self) -> int:
        return int(self.name)

    def referral(self, name: str) -> Referral:
        return Referral(f"{self.path}/referrals/{name}", self.ops)

    def create_referral(self, name: str) -> Referral:
        referral = self.referral(name)
        referral._mkdir()
        return referral

    def remove(self) -> None:
        """Remove the port itself (its links and referrals must be gone)."""
        self._rmdir()

    def linked_subsystems(self) -> list[str]:
        return [_basename(p) for p in self._children("subsystems")]

    def referrals(self) -> list[str]:
        return [_basename(p) for p in self._children("referrals")]

    def link(self, subsystem: Subsystem) -> None:
        try:
            self.ops.symlink(subsystem.path, f"{self.path}/subsystems/{subsystem.name}")
        except FileExistsError:
            pass  # linked already
        except OSError as exc:
            raise ConfigfsError(
                f"cannot link {subsystem.name} to port {self.name} "
                f"({self.get('addr', 'traddr')}:{self.get('addr', 'trsvcid')}): {describe(exc)}",
                hint="another program may already listen on that address and port; see dmesg",
            ) from exc

    def unlink(self, nqn: str) -> None:
        self._unlink(f"subsystems/{nqn}")

    def delete(self) -> None:
        if not self.exists():
            return
        for nqn in self.linked_subsystems():
            self.unlink(nqn)
        self._rmdir()


class Root(Node):
    """`/sys/kernel/config/nvmet`."""

    def __init__(self, path: str | os.PathLike[str] = NVMET_ROOT, ops: ConfigfsOps | None = None) -> None:
        super().__init__(os.fspath(path), ops or OsOps())

    def subsystem(self, nqn: str) -> Subsystem:
        return Subsystem(f"{self.path}/subsystems/{nqn}", self.ops)

    def port(self, port_id: int) -> Port:
        return Port(f"{self.path}/ports/{port_id}", self.ops)

    def host(self, hostnqn: str) -> Host:
        return Host(f"{self.path}/hosts/{hostnqn}", self.ops)

    def subsystems(self) -> list[Subsystem]:
        return [Subsystem(p, self.ops) for p in self._children("subsystems")]

    def ports(self) -> list[Port]:
        return [Port(p, self.ops) for p in self._children("ports") if _basename(p).isdigit()]

    def hosts(self) -> list[Host]:
        return [Host(p, self.ops) for p in self._children("hosts")]

    def create_subsystem(self, nqn: str) -> Subsystem:
        subsystem = self.subsystem(nqn)
        subsystem._mkdir()
        return subsystem

    def create_port(self, port_id: int) -> Port:
        port = self.port(port_id)
        port._mkdir()
        return port

    def create_host(self, hostnqn: str) -> Host:
        host = self.host(hostnqn)
        if not host.exists():
            host._mkdir()
        return host

    def free_port_id(self, preferred: int) -> int:
        """`preferred` if no port has that id yet, else the lowest free id above it."""
        taken = {p.port_id for p in self.ports()}
        port_id = preferred
        while port_id in taken:
            port_id += 1
        if port_id > 0xFFFF:
            raise ConfigfsError("no free nvmet port id")
        return port_id
