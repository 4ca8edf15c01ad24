"""Temp-dir configfs trees that behave like the kernel's where storagetm cares: mkdir
creates the attribute files and default groups, rmdir of a group with children fails
(ENOTEMPTY) while attribute files and default groups that hold only files go with it.

nvmet (`FakeConfigfs`): an enabled port (one with a linked subsystem) or referral refuses
attribute writes (EACCES). LIO (`FakeLio`): a backstore enables only once configured, and
its `wwn/` attributes are refused while a LUN links it (EINVAL); a LUN links only an
enabled backstore (ENODEV); a network portal's name must be IP:PORT (EINVAL)."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

SUBSYSTEM_ATTRS = ["attr_allow_any_host", "attr_model", "attr_serial", "attr_firmware", "attr_version"]
SUBSYSTEM_GROUPS = ["namespaces", "allowed_hosts"]
NAMESPACE_ATTRS = ["device_path", "device_uuid", "device_nguid", "enable", "buffered_io", "revalidate_size"]
PORT_ATTRS = ["addr_trtype", "addr_adrfam", "addr_traddr", "addr_trsvcid", "addr_treq", "addr_tsas"]
PORT_GROUPS = ["subsystems", "referrals", "ana_groups"]
Layout = tuple[list[str], list[str]]  # attribute files ("group/name" for one in a default group), groups


class FakeTree:
    ZERO = frozenset({"enable"})  # attributes that read 0 when made

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.links: list[str] = []  # symlinks made, in order, relative to the root
        self.fail_on: dict[str, int] = {}  # attribute name -> errno to raise on write

    def _layout(self, path: Path) -> Layout:
        raise NotImplementedError

    def _refuse(self, path: Path, value: str) -> None:
        """Raise as the kernel does for a write it refuses."""

    def mkdir(self, name: str) -> None:
        path = Path(name)
        attrs, groups = self._layout(path)
        path.mkdir()
        for group in groups:
            (path / group).mkdir()
        for attr in attrs:
            (path / attr).parent.mkdir(exist_ok=True)
            (path / attr).write_text("0\n" if Path(attr).name in self.ZERO else "\n")

    def rmdir(self, name: str) -> None:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        self._layout(path)
        for child in path.iterdir():
            if child.is_symlink() or (child.is_dir() and any(c.is_dir() or c.is_symlink() for c in child.iterdir())):
                raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        shutil.rmtree(path)

    def read(self, name: str) -> str:
        return Path(name).read_text()

    def write(self, name: str, value: str) -> None:
        path = Path(name)
        if path.name in self.fail_on:
            raise OSError(self.fail_on[path.name], os.strerror(self.fail_on[path.name]), str(path))
        self._refuse(path, value)
        if not path.is_file():
            raise OSError(errno.ENOENT, "No such file or directory", str(path))
        self.writes.append((str(path.relative_to(self.root)), value))
        if path.name != "revalidate_size":
            path.write_text(value + "\n")

    def symlink(self, target_name: str, link_name: str) -> None:
        target, link = Path(target_name), Path(link_name)
        if not target.is_dir():
            raise OSError(errno.ENOENT, "No such file or directory", str(target))
        link.symlink_to(target)
        self.links.append(str(link.relative_to(self.root)))

    def unlink(self, name: str) -> None:
        path = Path(name)
        if not path.is_symlink():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        path.unlink()

    def tree(self) -> list[str]:
        """Every path below the root (links with their target's name), sorted."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                rel = str(path.relative_to(self.root))
                if path.is_symlink():
                    found.append(f"{rel} -> {os.readlink(path).rpartition('/')[2]}")
                elif path.is_dir():
                    found.append(rel + "/")
                else:
                    found.append(f"{rel}={path.read_text().strip()}")
        return sorted(found)


def _not_permitted(path: Path) -> OSError:
    return OSError(errno.EPERM, "Operation not permitted", str(path))


class FakeConfigfs(FakeTree):
    ZERO = frozenset({"enable", "attr_allow_any_host"})

    def __init__(self, base: Path) -> None:
        super().__init__(base / "nvmet")
        for group in ("subsystems", "ports", "hosts"):
            (self.root / group).mkdir(parents=True)

    def _layout(self, path: Path) -> Layout:
        rel = path.relative_to(self.root).parts
        if len(rel) == 2 and rel[0] == "subsystems":
            return SUBSYSTEM_ATTRS, SUBSYSTEM_GROUPS
        if len(rel) == 4 and rel[0] == "subsystems" and rel[2] == "namespaces":
            return NAMESPACE_ATTRS, []
        if len(rel) == 2 and rel[0] == "ports":
            return PORT_ATTRS, PORT_GROUPS
        if len(rel) == 2 and rel[0] == "hosts":
            return ["dhchap_key", "dhchap_ctrl_key", "dhchap_hash", "dhchap_dhgroup"], []
        if len(rel) == 4 and rel[0] == "ports" and rel[2] == "referrals":
            return [*PORT_ATTRS[:5], "addr_portid", "enable"], []
        raise _not_permitted(path)

    def _refuse(self, path: Path, value: str) -> None:
        linked = path.parent / "subsystems"
        if path.name.startswith("addr_") and linked.is_dir() and any(linked.iterdir()):
            raise OSError(errno.EACCES, "Permission denied", str(path))
        in_referral = path.parent.parent.name == "referrals"
        if in_referral and path.name.startswith("addr_") and (path.parent / "enable").read_text().strip() == "1":
            raise OSError(errno.EACCES, "Permission denied", str(path))


BACKSTORE_ATTRS = ["control", "enable", "udev_path", "info", "attrib/block_size", "attrib/emulate_tpu",
                   "wwn/vendor_id", "wwn/product_id", "wwn/revision", "wwn/vpd_unit_serial"]  # fmt: skip
TPG_ATTRS = ["enable", "attrib/generate_node_acls", "attrib/cache_dynamic_acls", "attrib/demo_mode_write_protect",
             "attrib/authentication", "auth/userid", "auth/password", "auth/userid_mutual", "auth/password_mutual",
             "param/AuthMethod", "param/HeaderDigest", "param/MaxRecvDataSegmentLength",
             "param/MaxXmitDataSegmentLength", "param/FirstBurstLength", "param/MaxBurstLength", "param/InitialR2T",
             "param/ImmediateData"]  # fmt: skip
PORTAL_RE = re.compile(r"^(\[[0-9a-f:]+\]|[0-9.]+):[0-9]{1,5}$")


class FakeLio(FakeTree):
    """`target/` with `core/` and `iscsi/` (the modules loaded and the fabric registered)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base / "target")
        for group in ("core", "iscsi"):
            (self.root / group).mkdir(parents=True)

    def _layout(self, path: Path) -> Layout:
        rel = path.relative_to(self.root).parts
        if len(rel) == 2 and rel[0] == "core" and re.fullmatch(r"(iblock|fileio)_[0-9]+", rel[1]):
            return ["hba_info", "hba_mode"], []
        if len(rel) == 3 and rel[0] == "core":
            return BACKSTORE_ATTRS, ["pr", "statistics"]
        if len(rel) == 2 and rel[0] == "iscsi" and rel[1].startswith("iqn."):
            return [], ["fabric_statistics"]
        if len(rel) == 3 and rel[0] == "iscsi" and rel[2].startswith("tpgt_"):
            return TPG_ATTRS, ["lun", "np", "acls"]
        if len(rel) == 5 and rel[3] == "lun" and rel[4].startswith("lun_"):
            return ["alua_tg_pt_offline"], ["statistics"]
        if len(rel) == 5 and rel[3] == "np":
            if not PORTAL_RE.fullmatch(rel[4]):
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return [], []
        raise _not_permitted(path)

    def _refuse(self, path: Path, value: str) -> None:
        if path.name == "enable" and path.parent.parent.parent.name == "core" and value == "1":
            control = (path.parent / "control").read_text()
            if "udev_path=" not in control and "fd_dev_name=" not in control:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))  # "Missing udev_path= parameters"
        if path.parent.name == "wwn" and self.exported(path.parent.parent):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))  # "while active exports exist"

    def exported(self, backstore: Path) -> bool:
        return any(link.resolve() == backstore.resolve() for link in (self.root / "iscsi").glob("*/tpgt_*/lun/*/*")
                   if link.is_symlink())  # fmt: skip

    def symlink(self, target_name: str, link_name: str) -> None:
        target = Path(target_name)
        if (target / "enable").is_file() and (target / "enable").read_text().strip() != "1":
            raise OSError(errno.ENODEV, "No such device", str(target))
        super().symlink(target_name, link_name)


def discovery_ports(nvmet: Path) -> dict[str, Path]:
    """The discovery ports (8009) under nvmet/ports, by the address each listens on."""
    found = {}
    for port in sorted((nvmet / "ports").iterdir()):
        if (port / "addr_trsvcid").read_text().strip() == "8009":
            found[(port / "addr_traddr").read_text().strip()] = port
    return found
