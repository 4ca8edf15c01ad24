"""A temp-dir configfs that behaves like the kernel's nvmet tree where storagetm cares:
mkdir creates the attribute files and default groups, rmdir of a group with children
fails (ENOTEMPTY) while attribute files go with it, and an enabled port (one with a
linked subsystem) or referral refuses attribute writes (EACCES)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

SUBSYSTEM_ATTRS = ["attr_allow_any_host", "attr_model", "attr_serial", "attr_firmware", "attr_version"]
SUBSYSTEM_GROUPS = ["namespaces", "allowed_hosts"]
NAMESPACE_ATTRS = ["device_path", "device_uuid", "device_nguid", "enable", "buffered_io", "revalidate_size"]
PORT_ATTRS = ["addr_trtype", "addr_adrfam", "addr_traddr", "addr_trsvcid", "addr_treq", "addr_tsas"]
PORT_GROUPS = ["subsystems", "referrals", "ana_groups"]


class FakeConfigfs:
    def __init__(self, base: Path) -> None:
        self.root = base / "nvmet"
        for group in ("subsystems", "ports", "hosts"):
            (self.root / group).mkdir(parents=True)
        self.writes: list[tuple[str, str]] = []
        self.links: list[str] = []  # symlinks made, in order, relative to the root
        self.fail_on: dict[str, int] = {}  # attribute name -> errno to raise on write

    def _kind(self, path: Path) -> str:
        rel = path.relative_to(self.root).parts
        if len(rel) == 2 and rel[0] == "subsystems":
            return "subsystem"
        if len(rel) == 4 and rel[0] == "subsystems" and rel[2] == "namespaces":
            return "namespace"
        if len(rel) == 2 and rel[0] == "ports":
            return "port"
        if len(rel) == 2 and rel[0] == "hosts":
            return "host"
        if len(rel) == 4 and rel[0] == "ports" and rel[2] == "referrals":
            return "referral"
        raise OSError(errno.EPERM, "Operation not permitted", str(path))

    def mkdir(self, name: str) -> None:
        path = Path(name)
        kind = self._kind(path)
        path.mkdir()
        attrs, groups = {
            "subsystem": (SUBSYSTEM_ATTRS, SUBSYSTEM_GROUPS),
            "namespace": (NAMESPACE_ATTRS, []),
            "port": (PORT_ATTRS, PORT_GROUPS),
            "host": (["dhchap_key", "dhchap_ctrl_key", "dhchap_hash", "dhchap_dhgroup"], []),
            "referral": ([*PORT_ATTRS[:5], "addr_portid", "enable"], []),
        }[kind]
        for attr in attrs:
            (path / attr).write_text("0\n" if attr in ("enable", "attr_allow_any_host") else "\n")
        for group in groups:
            (path / group).mkdir()

    def rmdir(self, name: str) -> None:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        self._kind(path)
        for child in path.iterdir():
            if (child.is_dir() and any(child.iterdir())) or child.is_symlink():
                raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        shutil.rmtree(path)

    def read(self, name: str) -> str:
        path = Path(name)
        return path.read_text()

    def write(self, name: str, value: str) -> None:
        path = Path(name)
        if path.name in self.fail_on:
            raise OSError(self.fail_on[path.name], os.strerror(self.fail_on[path.name]), str(path))
        linked = path.parent / "subsystems"
        if path.name.startswith("addr_") and linked.is_dir() and any(linked.iterdir()):
            raise OSError(errno.EACCES, "Permission denied", str(path))
        in_referral = path.parent.parent.name == "referrals"
        if in_referral and path.name.startswith("addr_") and (path.parent / "enable").read_text().strip() == "1":
            raise OSError(errno.EACCES, "Permission denied", str(path))
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
