"""Secure Boot, enforced by firmware with Microsoft's keys: the USB stick's chain (shim,
systemd-boot, Debian's kernel) boots and every feature works under the kernel's lockdown,
the boot menu's entries are chosen and edited by key presses, and the same firmware refuses
an unsigned image (so the boots in test_boot_media.py prove enforcement, not luck).
Slow: these boots run once per image (ci/test.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from storagetm.model import DISCOVERY_NQN
from testbed.initiator import CONNECT_ALL, Remote, connected, disconnect_all, prepare_initiator, wait_address
from testbed.machine import VM, boot_drive, sha256_file
from testbed.pair import BOOT_TIMEOUT, LOGS, Pair, image, vm_pair

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MENU = r"Boot in \d+ s"  # systemd-boot's countdown: the menu is up and waits for keys
BLOCK = 4096


def stick_copy(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    stick = workdir / "storagetm.raw"
    shutil.copy(image("storagetm.raw"), stick)  # the guest must not change our build output
    return stick


def unsigned_stick(path: Path, uki: Path) -> None:
    """The media as they were before: the (unsigned) UKI as EFI/BOOT/BOOTX64.EFI on a GPT ESP."""
    mib = uki.stat().st_size // (1 << 20) + 8
    subprocess.run(["truncate", "-s", f"{mib + 2}M", str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: gpt\nstart=2048, type=uefi\n", check=True)
    esp = f"{path}@@1M"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["mformat", "-i", esp, "-F", "-T", str(mib * 2048), "::"], check=True, env=env)
    subprocess.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], check=True, env=env)
    subprocess.run(["mcopy", "-i", esp, str(uki), "::/EFI/BOOT/BOOTX64.EFI"], check=True, env=env)


@pytest.mark.parametrize("secure_boot", [True, False])
def test_firmware_refuses_an_unsigned_image_only_with_secure_boot(secure_boot: bool) -> None:
    workdir = LOGS / f"unsigned-{'secure' if secure_boot else 'plain'}"
    workdir.mkdir(parents=True, exist_ok=True)
    stick = workdir / "unsigned.raw"
    unsigned_stick(stick, image("storagetm.efi"))
    with VM("target", workdir, secure_boot=secure_boot, extra=boot_drive(stick)) as vm:
        if secure_boot:
            vm.wait_for(r"BOOTSTICK.*Access Denied", 180)
            vm.wait_for(r"No bootable option or device was found", 180)
            assert "EFI stub" not in vm.console()
        else:  # the control: the same stick boots when nothing is enforced
            vm.wait_for(r"EFI stub: ", 180)


def remote_by_serial(pair: Pair) -> dict[str, Remote]:
    return {remote.serial: remote for remote in connected(pair.initiator)}


def write_block(pair: Pair, remote: Remote, fill: str, block: int) -> int:
    """Write one block of `fill` characters through the link; the exit status of dd."""
    _, rc = pair.initiator.run(f"head -c {BLOCK} /dev/zero | tr '\\0' '{fill}' | dd of=/dev/{remote.block} "
                               f"bs={BLOCK} seek={block} oflag=direct conv=notrunc,fsync status=none")  # fmt: skip
    return rc


def read_block(pair: Pair, remote: Remote, block: int) -> str:
    return pair.initiator.sh(f"dd if=/dev/{remote.block} bs={BLOCK} skip={block} count=1 iflag=direct "
                             "status=none | tr -d '\\0' | head -c 16")  # fmt: skip


def file_block(path: Path, block: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * BLOCK)
        return f.read(BLOCK)


def test_read_only_entry_chosen_at_the_boot_menu() -> None:
    """The person who must not change a disk picks read-only before anything is exported."""
    workdir = LOGS / "secure-boot-menu-read-only"
    with vm_pair(workdir, {"MENU0001": "virtio"}, stick=stick_copy(workdir), shell_timeout=None) as pair:
        pair.target.wait_for(MENU, 180)
        pair.target.send_keys("down", "ret")
        pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
        pair.initiator.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(pair.initiator)
        screen = pair.target.console()
        screen = screen[screen.rfind("storagetm: target disk mode") :]
        assert "(Secure Boot on)" in screen and "[read-only]" in screen
        assert "(read-write)" not in pair.target.console()  # not even for a moment (the export log lines)
        address = wait_address(pair.target, "169.254.")
        pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
        (remote,) = connected(pair.initiator)
        assert pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300).split()[0] == pair.sums["MENU0001"]
        assert write_block(pair, remote, "W", 8) != 0
        disconnect_all(pair.initiator)
    assert sha256_file(pair.disks["MENU0001"].path) == pair.sums["MENU0001"]


LOCKDOWN_DISKS = {"LOCKRW01": "virtio", "LOCKRO01": "nvme", "LOCKSN01": "sata"}
# Typed into the secure entry's options with systemd-boot's editor (`e`): a root shell for the
# test, and one disk in each mode, so that every kernel feature storagetm uses runs under lockdown.
EDIT = " systemd.debug_shell=ttyS1 storagetm.mode=rw,LOCKRO01=ro,LOCKSN01=snapshot"


def test_every_feature_works_under_lockdown() -> None:
    workdir = LOGS / "secure-boot-lockdown"
    with vm_pair(workdir, LOCKDOWN_DISKS, stick=stick_copy(workdir), shell_timeout=None) as pair:
        pair.target.wait_for(MENU, 180)
        pair.target.send_keys("down", "down", "down", "e", "end")
        pair.target.type_text(EDIT)
        pair.target.send_keys("ret")
        pair.target.wait_shell(BOOT_TIMEOUT)
        pair.initiator.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(pair.initiator)
        target = pair.target
        cmdline = target.sh("cat /proc/cmdline")
        assert "storagetm.auth=1 storagetm.tls=1" + EDIT in cmdline
        assert "[integrity]" in target.sh("cat /sys/kernel/security/lockdown")
        target.wait_for(r"Exported disks \(3\)", BOOT_TIMEOUT)
        status = json.loads(target.sh("storagetm status --json --show-secrets"))
        assert status["secure_boot"] is True
        modes = {e["disk"]["serial"]: e["mode"] for e in status["exports"]}
        assert modes == {"LOCKRW01": "rw", "LOCKRO01": "ro", "LOCKSN01": "snapshot"}
        host, secret, key = status["auth"]["hosts"][0], status["auth"]["secret"], status["tls"]["key"]
        address = wait_address(target, "169.254.")
        for nqn in [DISCOVERY_NQN, *(e["nqn"] for e in status["exports"])]:
            pair.initiator.sh(f"nvme check-tls-key -i -n {host} -d {key} -c {nqn}")
        pair.initiator.sh(f"{CONNECT_ALL} -a {address} --hostnqn={host} --dhchap-secret={secret} --tls")
        remotes = remote_by_serial(pair)
        assert sorted(remotes) == sorted(LOCKDOWN_DISKS)
        for serial, remote in remotes.items():
            assert pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300).split()[0] == pair.sums[serial]
        assert write_block(pair, remotes["LOCKRW01"], "R", 8) == 0
        assert write_block(pair, remotes["LOCKRO01"], "O", 8) != 0
        assert write_block(pair, remotes["LOCKSN01"], "S", 8) == 0
        assert read_block(pair, remotes["LOCKSN01"], 8) == "S" * 16  # the snapshot reads its own write back
        assert "Handshake with" in target.sh("journalctl -u tlshd --no-pager | tail -n 5")
        # Loaded for this under lockdown, where only signed modules load: the fabric and the
        # modes' layers (TLS is proven by the handshake above).
        loaded = target.sh("cut -d' ' -f1 /proc/modules").split()
        for module in ("nvmet_tcp", "dm_flakey", "dm_snapshot"):
            assert module in loaded, loaded
        disconnect_all(pair.initiator)
    assert file_block(pair.disks["LOCKRW01"].path, 8) == b"R" * BLOCK
    for serial in ("LOCKRO01", "LOCKSN01"):
        assert sha256_file(pair.disks[serial].path) == pair.sums[serial]
