"""One QEMU VM under TCG: serial console captured to a file, a root shell on a second
serial port (systemd.debug_shell=ttyS1, asked for on the kernel command line), the whole
kernel log copied to a third (ttyS2) once the shell is up, QMP for hot-plug. Always
cleaned up; never leaves a QEMU process behind."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import VMError
from testbed.wait import until

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot enforced, with Microsoft's KEK and db (including the third-party UEFI CA that
# signs shim) enrolled: what a PC that ships with Windows trusts. Needs SMM and a secure flash.
OVMF_SECURE_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_MS_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
# QMP send-key codes for the characters tests type at a boot menu's editor.
QCODES = {" ": "spc", ".": "dot", ",": "comma", "=": "equal", "-": "minus", "/": "slash"}
SHIFTED = {"_": "minus", ":": "semicolon"}
# No echo, no prompt, no bracketed-paste escapes: only command output comes back.
QUIET_SHELL = "stty -echo; PS1=''; PS2=''; unset PROMPT_COMMAND; bind 'set enable-bracketed-paste off' 2>/dev/null"
CURSOR_MOVE = re.compile(r"\x1b\[\d+;\d+H")
ANSI = re.compile(r"\x1b\[[0-9;:?]*[A-Za-z]")
PANIC = re.compile(r"BUG:|Oops|Kernel panic|RIP:|Workqueue:")  # an oops, as the console shows it
# A USB stick the firmware boots first; its drive is `boot_drive()`'s.
USB_STICK = "usb-storage,bus=xhci.0,drive=boot,bootindex=0,serial=BOOTSTICK"
DEFAULT_CPU = "qemu64"


def qemu_binary() -> str:
    """STORAGETM_QEMU, else the QEMU that ci/setup-host.sh unpacked into the cache, else the host's."""
    chosen = os.environ.get("STORAGETM_QEMU")
    if chosen:
        return chosen
    cached = Path(os.environ.get("STORAGETM_CACHE", "/var/cache/storagetm")) / "qemu" / "qemu-system-x86_64"
    return str(cached) if cached.exists() else "qemu-system-x86_64"


def qemu_cpu() -> str:
    """STORAGETM_QEMU_CPU, else TCG's baseline x86-64 model, not `max`: side by side it moved 1.44x
    the data over NVMe/TCP (no AVX for guests to pick, which TCG emulates slowly), and the guest
    crashes once seen under `max` (impossible RFLAGS, a segfaulting sha256sum) pointed at its
    emulation (docs/measurements.md, "CPU model")."""
    return os.environ.get("STORAGETM_QEMU_CPU", DEFAULT_CPU)


@dataclass
class Disk:
    """A disk file on the host and how QEMU attaches it."""

    path: Path
    kind: str  # virtio, nvme, sata, usb
    serial: str
    node_id: str = ""

    @property
    def node(self) -> str:
        """The QEMU block node the guest's device reads (QMP block_resize names it)."""
        return self.node_id or f"d{self.serial}"

    @property
    def device_id(self) -> str:
        return f"dev{self.node}"

    def qemu_args(self) -> list[str]:
        node = self.node
        drive = ["-blockdev", f"driver=file,filename={self.path},node-name={node}-file,cache.direct=off",
                 "-blockdev", f"driver=raw,file={node}-file,node-name={node}"]  # fmt: skip
        return [*drive, "-device", self.device_spec(node)]

    def device_spec(self, node: str) -> str:
        return {
            "virtio": f"virtio-blk-pci,drive={node},serial={self.serial},id=dev{node}",
            "nvme": f"nvme,drive={node},serial={self.serial},id=dev{node}",
            "sata": f"ide-hd,drive={node},bus=ide.1,serial={self.serial},model=STM SATA DISK,id=dev{node}",
            "usb": f"usb-storage,drive={node},bus=xhci.0,serial={self.serial},id=dev{node}",
        }[self.kind]


def forwarded_nic(host_port: int, guest_port: int, mac: str = "52:54:00:00:00:03") -> list[str]:
    """QEMU arguments for a second NIC, user-mode and restricted: the guest reaches nothing
    through it, and the host reaches only `guest_port`, at 127.0.0.1:`host_port`. A program
    on the host (a browser) then talks to one service of the guest and to nothing else."""
    netdev = f"user,id=fwd,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=fwd,mac={mac},romfile="]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for a forward)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def boot_drive(medium: Path, device: str = USB_STICK, snapshot: bool = False) -> list[str]:
    """QEMU arguments for the medium the firmware boots (a USB stick unless `device` says
    otherwise); with `snapshot`, QEMU keeps the guest's writes to itself."""
    options = ",snapshot=on" if snapshot else ""
    return ["-drive", f"if=none,id=boot,format=raw,file={medium}{options}", "-device", device]


@dataclass
class VM:
    name: str
    workdir: Path
    kernel: Path | None = None
    append: str = ""
    disks: list[Disk] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    link_socket: Path | None = None
    link_server: bool = True
    mac: str = "52:54:00:12:34:56"
    memory: int = 1024
    uuid: str = "6a1f7c2e-0b7d-4f4e-9a51-3d2c1b0a9f88"
    secure_boot: bool = False  # OVMF with Secure Boot enforced and Microsoft's keys
    qemu: str = field(default_factory=qemu_binary)
    cpu: str = field(default_factory=qemu_cpu)
    wrapper: list[str] = field(default_factory=list)  # e.g. ip netns exec NS: QEMU's network namespace
    proc: subprocess.Popen[bytes] | None = None
    qmp: Any = None
    shell: socket.socket | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}-console.log"

    @property
    def kernel_log(self) -> Path:
        """Every kernel message at every level, without the console's loglevel filter and
        without the target's dashboard in between: what a failure report needs."""
        return self.workdir / f"{self.name}-kernel.log"

    @property
    def shell_socket(self) -> Path:
        return self.workdir / f"{self.name}-shell.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / f"{self.name}-qmp.sock"

    def command(self) -> list[str]:
        vars_copy = self.workdir / f"{self.name}-vars{'-secure' if self.secure_boot else ''}.fd"
        if not vars_copy.exists():
            shutil.copy(OVMF_MS_VARS if self.secure_boot else OVMF_VARS, vars_copy)
        if self.secure_boot:
            machine = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
        else:
            machine = ["-machine", "q35"]
        code = OVMF_SECURE_CODE if self.secure_boot else OVMF_CODE
        cmd = [
            self.qemu, "-accel", "tcg", *machine, "-cpu", self.cpu, "-smp", "1",
            "-m", str(self.memory), "-nographic", "-no-reboot", "-uuid", self.uuid,
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
            "-chardev", f"socket,id=sh,path={self.shell_socket},server=on,wait=off", "-serial", "chardev:sh",
            "-chardev", f"file,id=klog,path={self.kernel_log},append=on", "-serial", "chardev:klog",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-device", "qemu-xhci,id=xhci", "-monitor", "none",
            # q35's root bus cannot hot-plug; tests plug disks into this port.
            "-device", "pcie-root-port,id=hp0,chassis=1,slot=1,addr=0x10",
        ]  # fmt: skip
        if self.kernel:
            cmd += ["-kernel", str(self.kernel)]
            if self.append:
                cmd += ["-append", self.append]
        if self.link_socket:
            server = "on" if self.link_server else "off"
            cmd += ["-netdev", f"stream,id=link,server={server},addr.type=unix,addr.path={self.link_socket}",
                    # No iPXE ROM: it would also drive a network-boot NIC and hang the kernel it loads.
                    "-device", f"virtio-net-pci,netdev=link,mac={self.mac},addr=0x3,romfile="]  # fmt: skip
        else:
            cmd += ["-nic", "none"]
        for disk in self.disks:
            cmd += disk.qemu_args()
        return self.wrapper + cmd + self.extra

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.console_log, self.shell_socket, self.qmp_socket):
            path.unlink(missing_ok=True)
        if self.link_socket and not self.link_server:
            _wait_path(self.link_socket, 30)
        with open(self.workdir / f"{self.name}-qemu.err", "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)  # fmt: skip
        try:
            _wait_path(self.qmp_socket, 30)
            time.sleep(0.2)
            if self.proc.poll() is not None:
                raise VMError("exited")
        except VMError:
            log = (self.workdir / f"{self.name}-qemu.err").read_text(errors="replace")
            self.stop()
            raise VMError(f"{self.name}: QEMU did not start: {log.strip()[-500:]}") from None
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.qmp = QEMUMonitorProtocol(str(self.qmp_socket))
        self.qmp.connect()

    def hotplug(self, disk: Disk, bus: str = "hp0") -> float:
        """Plug `disk` into the running VM through QMP: its block nodes, then its device, in the
        hot-plug root port `bus` (a disk kind with a bus of its own keeps that). Returns
        time.monotonic() when the device was added, for who times what the guest does then."""
        node = disk.node
        self.qmp.cmd("blockdev-add", driver="file", filename=str(disk.path), **{"node-name": f"{node}-file"})
        self.qmp.cmd("blockdev-add", driver="raw", file=f"{node}-file", **{"node-name": node})
        driver, *options = disk.device_spec(node).split(",")
        args = {"bus": bus, **dict(option.split("=", 1) for option in options)}
        plugged = time.monotonic()
        self.qmp.cmd("device_add", driver=driver, **args)
        return plugged

    def unplug(self, disk: Disk, timeout: float = 60) -> None:
        """Pull a disk `hotplug()` plugged in, as if from its slot, and drop its block nodes
        once the guest let the device go (so the same disk can be plugged in again)."""
        from qemu.qmp import ExecuteError

        self.qmp.cmd("device_del", id=disk.device_id)
        for node in (disk.node, f"{disk.node}-file"):

            def released(node: str = node) -> bool:
                try:
                    self.qmp.cmd("blockdev-del", **{"node-name": node})
                except ExecuteError:  # the device holds it until the guest acknowledged its removal
                    return False
                return True

            until(released, timeout, f"{self.name}: {node} still in use {timeout:.0f} s after device_del")

    def send_keys(self, *keys: str) -> None:
        """Press each key (a QMP qcode: "down", "ret", "e", "end", …) on the VM's keyboard."""
        for key in keys:
            self.qmp.cmd("send-key", keys=[{"type": "qcode", "data": key}])
            time.sleep(0.15)  # the firmware polls its keyboard; keys sent faster get lost

    def type_text(self, text: str) -> None:
        for char in text:
            code = QCODES.get(char, char.lower())
            combo = [{"type": "qcode", "data": "shift"}] if char.isupper() or char in SHIFTED else []
            self.qmp.cmd("send-key", keys=[*combo, {"type": "qcode", "data": SHIFTED.get(char, code)}])
            time.sleep(0.15)

    def raw_console(self) -> str:
        """The console as it came, escapes and all."""
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console(self) -> str:
        try:
            # Bytes, not text mode: universal newlines would turn the tty's "\r\r\n" into two lines.
            # A cursor move starts a new line of the in-place dashboard.
            text = CURSOR_MOVE.sub("\n", self.console_log.read_bytes().decode(errors="replace"))
            return ANSI.sub("", text).replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            match = regex.search(self.console(), since)
            if match is None and self.proc and self.proc.poll() is not None:
                raise VMError(f"{self.name}: QEMU exited ({self.proc.returncode}) waiting for {pattern!r}")
            return match

        return until(seen, timeout, f"{self.name}: no {pattern!r} on the console within {timeout:.0f} s", pause=0.5)

    def sh(self, command: str, timeout: float = 120, check: bool = True) -> str:
        out, rc = self.run(command, timeout)
        if check and rc != 0:
            raise VMError(f"{self.name}: `{command}` exited {rc}:\n{out[-2000:]}")
        return out

    def _shell(self, deadline: float) -> socket.socket:
        """One connection to the debug shell for the VM's life: output the guest writes
        while no client is connected is lost, except the UART's last 16 bytes, which would
        then show up in the next command's output."""
        if self.shell is not None:
            return self.shell
        sock = socket.socket(socket.AF_UNIX)

        def connected() -> bool:
            try:
                sock.connect(str(self.shell_socket))
            except OSError:
                return False
            return True

        try:
            until(connected, deadline - time.monotonic(), f"{self.name}: cannot connect to {self.shell_socket}", 0.5)
        except VMError:
            sock.close()
            raise
        sock.settimeout(0.5)
        sock.sendall(QUIET_SHELL.encode() + b"\n")
        self.shell = sock
        return sock

    def run(self, command: str, timeout: float = 120) -> tuple[str, int]:
        """Run a command in the guest's debug shell; return its output and exit status."""
        token = secrets.token_hex(4)
        regex = re.compile(rf"__RC_(\d+)_{token}__\n")
        deadline = time.monotonic() + timeout
        sock = self._shell(deadline)
        sock.settimeout(0.05)
        with contextlib.suppress(TimeoutError):  # drop what earlier commands left behind
            while sock.recv(65536):
                pass
        sock.settimeout(0.5)
        sock.sendall(f"{{ {command.rstrip().rstrip(';')} ; }} 2>&1; echo __RC_$?_{token}__\n".encode())
        buf = b""
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self.shell = None
                break
            buf += chunk
            text = ANSI.sub("", buf.decode(errors="replace")).replace("\r", "")
            match = regex.search(text)
            if match:
                # If the shell still echoes (its set-up line was lost), drop the echoed command.
                lines = [ln for ln in text[: match.start()].split("\n") if f"_{token}__" not in ln]
                return "\n".join(lines).strip("\n"), int(match.group(1))
        self.close_shell()
        raise VMError(f"{self.name}: `{command}` did not finish within {timeout:.0f} s; its kernel said last:\n"
                      + self.kernel_tail(15))  # fmt: skip

    def kernel_tail(self, lines: int = 40) -> str:
        """The kernel log's last lines; a panic stops its copy, so the console's oops comes too."""
        try:
            text = self.kernel_log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            text = ""
        oops = [ln for ln in self.console().splitlines() if PANIC.search(ln)]
        return "\n".join(text.splitlines()[-lines:] + oops[-lines:]) or "(no kernel log)"

    def close_shell(self) -> None:
        if self.shell is not None:
            self.shell.close()
            self.shell = None

    def wait_shell(self, timeout: float) -> None:
        def answers() -> bool:
            try:
                self.run("true", timeout=10)
                self.run(QUIET_SHELL, timeout=10)
            except (VMError, OSError):
                return False
            return True

        until(answers, timeout, f"{self.name}: no debug shell within {timeout:.0f} s", pause=2)
        # Once per boot; a subshell, because run() wraps the command in braces where a bare `&`
        # cannot end it.
        self.run("[ -e /run/kernel-log-copied ] || { touch /run/kernel-log-copied; "
                 "(setsid dmesg --follow --color=never > /dev/ttyS2 2>&1 < /dev/null &); }", timeout=10)  # fmt: skip

    def stop(self) -> None:
        self.close_shell()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-lines:])


def _wait_path(path: Path, timeout: float) -> None:
    until(path.exists, timeout, f"{path} did not appear within {timeout:.0f} s", pause=0.1)


def make_disk(path: Path, size: int, seed: bytes) -> str:
    """A disk file of `size` bytes of reproducible pseudo-random content; returns sha256."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "wb") as f:
        counter = 0
        while f.tell() < size:
            block = hashlib.shake_256(seed + counter.to_bytes(8, "little")).digest(1 << 20)
            f.write(block)
            digest.update(block)
            counter += 1
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
