"""What every configfs tree storagetm drives has in common (nvmet's, LIO's): the file
operations, behind `ConfigfsOps` so that unit tests run on a temp-dir fake that behaves
like the kernel, and one node base that makes, reads, writes and removes with errors that
name the path. Paths are plain strings: a hot-plugged disk is exported through a dozen of
them, and pathlib's objects cost more than the configfs calls' own work on a slow CPU."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Protocol

from storagetm.errors import ConfigfsError
from storagetm.system.kernelfs import read_attribute


class ConfigfsOps(Protocol):
    """The file operations configfs needs; `OsOps` is the real one."""

    def mkdir(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def read(self, path: str) -> str: ...
    def write(self, path: str, value: str) -> None: ...
    def symlink(self, target: str, link: str) -> None: ...
    def unlink(self, path: str) -> None: ...


class OsOps:
    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read(self, path: str) -> str:
        return read_attribute(path)

    def write(self, path: str, value: str) -> None:
        # configfs wants the whole value in one write() call.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def symlink(self, target: str, link: str) -> None:
        os.symlink(target, link)

    def unlink(self, path: str) -> None:
        os.unlink(path)


def basename(path: str) -> str:
    return path.rpartition("/")[2]


def describe(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)


class ConfigfsNode:
    """One configfs directory. `_write` takes the attribute's path below the node."""

    def __init__(self, path: str, ops: ConfigfsOps) -> None:
        self.path = path
        self.ops = ops

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    @property
    def name(self) -> str:
        return basename(self.path)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def _read(self, attribute: str) -> str:
        try:
            return self.ops.read(f"{self.path}/{attribute}").strip()
        except OSError as exc:
            raise ConfigfsError(f"cannot read {self.path}/{attribute}: {describe(exc)}") from exc

    def _write(self, attribute: str, value: str, *, secret: bool = False) -> None:
        try:
            self.ops.write(f"{self.path}/{attribute}", value)
        except OSError as exc:
            shown = "the secret" if secret else repr(value)
            raise ConfigfsError(f"cannot set {self.path}/{attribute} to {shown}: {describe(exc)}") from exc

    def _mkdir(self) -> None:
        try:
            self.ops.mkdir(self.path)
        except OSError as exc:
            raise ConfigfsError(f"cannot create {self.path}: {describe(exc)}") from exc

    def _rmdir(self) -> None:
        try:
            self.ops.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigfsError(f"cannot remove {self.path}: {describe(exc)}") from exc

    def _unlink(self, link: str) -> None:
        """Remove a symlink below the node; one already gone is no error."""
        try:
            self.ops.unlink(f"{self.path}/{link}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigfsError(f"cannot remove the link {self.path}/{link}: {describe(exc)}") from exc

    def _children(self, group: str) -> Iterator[str]:
        directory = f"{self.path}/{group}"
        if os.path.isdir(directory):
            yield from (f"{directory}/{name}" for name in sorted(os.listdir(directory)))
