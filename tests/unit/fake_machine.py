"""A fake of what the backing layer runs (losetup, dmsetup, mount, umount, modprobe), with
the sysfs files storagetm reads to find loop and device-mapper devices, and a fake of the
kernel's .nvme keyring: enough to run the reconciler end to end on a temp directory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from storagetm.backing.modes import System
from storagetm.security.tls import Keyring


class FakeMachine:
    def __init__(self, base: Path) -> None:
        self.sys_block = base / "sys-block"
        self.sys_block.mkdir(parents=True)
        self.cow_dir = base / "cow"
        self.mounts: set[Path] = set()
        self.commands: list[str] = []
        self.fail: dict[str, str] = {}  # command word ("dmsetup create") -> stderr to fail with
        self.next_loop = 0
        self.next_dm = 0

    def system(self) -> System:
        return System(run=self.run, mem_available=lambda: 8 << 30, store_free=lambda _p: 0, cow_dir=self.cow_dir,
                      mounted=lambda p: p in self.mounts, sys_block=self.sys_block)  # fmt: skip

    def loops(self) -> dict[str, str]:
        return {f"/dev/{p.parent.parent.name}": p.read_text().strip()
                for p in self.sys_block.glob("loop*/loop/backing_file")}  # fmt: skip

    def dms(self) -> set[str]:
        return {p.read_text().strip() for p in self.sys_block.glob("dm-*/dm/name")}

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        words = " ".join(argv[:2])
        self.commands.append(" ".join(argv))
        if words in self.fail:
            return subprocess.CompletedProcess(list(argv), 1, "", self.fail[words])
        out = ""
        if words == "losetup --find":
            device = self.sys_block / f"loop{self.next_loop}"
            self.next_loop += 1
            (device / "loop").mkdir(parents=True)
            (device / "loop" / "backing_file").write_text(argv[3] + "\n")
            out = f"/dev/{device.name}\n"
        elif words == "losetup --detach":
            shutil.rmtree(self.sys_block / argv[2].rpartition("/")[2])
        elif words == "dmsetup create":
            (self.sys_block / f"dm-{self.next_dm}" / "dm").mkdir(parents=True)
            (self.sys_block / f"dm-{self.next_dm}" / "dm" / "name").write_text(argv[2] + "\n")
            self.next_dm += 1
        elif words == "dmsetup remove":
            for path in self.sys_block.glob("dm-*/dm/name"):
                if path.read_text().strip() == argv[2]:
                    shutil.rmtree(path.parent.parent)
        elif argv[0] == "mount":
            self.mounts.add(Path(argv[-1]))
        elif argv[0] == "umount":
            self.mounts.discard(Path(argv[-1]))
        return subprocess.CompletedProcess(list(argv), 0, out, "")


class FakeKeyring(Keyring):
    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, bytes] = {}

    def add(self, description: str, payload: bytes) -> None:
        self.keys[description] = payload

    def find(self, description: str) -> bool:
        return description in self.keys

    def revoke(self, description: str) -> None:
        self.keys.pop(description, None)
