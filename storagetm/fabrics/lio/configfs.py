"""A typed model of the kernel's LIO configfs tree (/sys/kernel/config/target), the part
storagetm uses: backstores under `core/<plugin>_<index>/<name>` and iSCSI targets under
`iscsi/<iqn>/tpgt_<tag>` with their LUNs and network portals. Attributes live in
subdirectories (`attrib/`, `auth/`, `param/`, `wwn/`), unlike nvmet's prefixed files."""

from __future__ import annotations

import os

from storagetm.errors import ConfigfsError
from storagetm.fabrics.configfs import ConfigfsNode, ConfigfsOps, OsOps, describe

LIO_ROOT = "/sys/kernel/config/target"
TPG_TAG = 1
LUN_LINK = "storage"  # the name of a LUN's link to its backstore


class Backstore(ConfigfsNode):
    """A storage object: `control` configures it, `enable` opens the device; its `wwn/`
    attributes (what SCSI INQUIRY reports) are refused while a LUN exports it."""

    def configure(self, control: str) -> None:
        self._write("control", control)

    def set(self, group: str, name: str, value: str) -> None:
        self._write(f"{group}/{name}", value)

    def enable(self) -> None:
        self._write("enable", "1")

    @property
    def enabled(self) -> bool:
        return self._read("enable") == "1"

    def delete(self) -> None:
        self._rmdir()


class Hba(ConfigfsNode):
    """`core/<plugin>_<index>`: the host bus adapter a plugin's storage objects sit on."""

    def backstore(self, name: str) -> Backstore:
        return Backstore(f"{self.path}/{name}", self.ops)

    def create_backstore(self, name: str) -> Backstore:
        backstore = self.backstore(name)
        backstore._mkdir()
        return backstore

    def delete(self) -> None:
        self._rmdir()


class Lun(ConfigfsNode):
    def link(self, backstore: Backstore) -> None:
        try:
            self.ops.symlink(backstore.path, f"{self.path}/{LUN_LINK}")
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigfsError(f"cannot export {backstore.path} as {self.path}: {describe(exc)}") from exc

    def linked(self) -> bool:
        return os.path.islink(f"{self.path}/{LUN_LINK}")

    def delete(self) -> None:
        if not self.exists():
            return
        self._unlink(LUN_LINK)
        self._rmdir()


class Tpg(ConfigfsNode):
    """A target portal group: `attrib/`, `auth/` and `param/` are its settings, `lun/` and
    `np/` (network portals, named `IP:PORT`, IPv6 in brackets) what it offers; logins are
    taken only while `enable` is 1."""

    def set(self, group: str, name: str, value: str, *, secret: bool = False) -> None:
        self._write(f"{group}/{name}", value, secret=secret)

    def lun(self, index: int = 0) -> Lun:
        return Lun(f"{self.path}/lun/lun_{index}", self.ops)

    def create_lun(self, index: int = 0) -> Lun:
        lun = self.lun(index)
        lun._mkdir()
        return lun

    def portal(self, name: str) -> ConfigfsNode:
        return ConfigfsNode(f"{self.path}/np/{name}", self.ops)

    def create_portal(self, name: str) -> ConfigfsNode:
        portal = self.portal(name)
        try:
            self.ops.mkdir(portal.path)
        except OSError as exc:
            raise ConfigfsError(f"cannot listen on {name} for {self.path}: {describe(exc)}",
                                hint="another program may already listen on that port; see dmesg") from exc  # fmt: skip
        return portal

    def remove_portal(self, name: str) -> None:
        self.portal(name)._rmdir()

    @property
    def enabled(self) -> bool:
        return self._read("enable") == "1"

    def enable(self, on: bool = True) -> None:
        self._write("enable", "1" if on else "0")

    def delete(self) -> None:
        self._rmdir()


class Target(ConfigfsNode):
    def tpg(self, tag: int = TPG_TAG) -> Tpg:
        return Tpg(f"{self.path}/tpgt_{tag}", self.ops)

    def create_tpg(self, tag: int = TPG_TAG) -> Tpg:
        tpg = self.tpg(tag)
        tpg._mkdir()
        return tpg

    def delete(self) -> None:
        self._rmdir()


class Root(ConfigfsNode):
    """`/sys/kernel/config/target`, with `core/` and `iscsi/` there (the kernel modules
    loaded, `iscsi/` made: storagetm.fabrics.lio.kernel)."""

    def __init__(self, path: str | os.PathLike[str] = LIO_ROOT, ops: ConfigfsOps | None = None) -> None:
        super().__init__(os.fspath(path), ops or OsOps())

    def hba(self, name: str) -> Hba:
        return Hba(f"{self.path}/core/{name}", self.ops)

    def create_hba(self, name: str) -> Hba:
        hba = self.hba(name)
        hba._mkdir()
        return hba

    def target(self, iqn: str) -> Target:
        return Target(f"{self.path}/iscsi/{iqn}", self.ops)

    def create_target(self, iqn: str) -> Target:
        target = self.target(iqn)
        target._mkdir()
        return target
