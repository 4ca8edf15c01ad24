"""What the daemon is asked to do, from the command line and the kernel command line.

Each kernel command line option is declared once (name, converter, help) in
KERNEL_OPTIONS; `storagetm --help-kernel-cmdline` and the README table come from it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from storagetm.auth import check_secret
from storagetm.disks import Disk
from storagetm.errors import UsageError
from storagetm.exports import IO_TRSVCID
from storagetm.identity import check_nqn_prefix, valid_nqn
from storagetm.modes import Mode, parse_size
from storagetm.tls import check_key

PREFIX = "storagetm."


class OptionError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    all_disks: bool = False  # --all: every eligible disk, now and hotplugged later
    lift_guards: bool = False  # --all twice: root disk and boot medium too
    devices: tuple[str, ...] = ()  # explicit DEVICE/FILE arguments or storagetm.disks=
    nqn_base: str | None = None
    port: int = IO_TRSVCID
    mode: Mode = Mode.READ_WRITE  # for every disk without a per-disk mode
    disk_modes: tuple[tuple[str, Mode], ...] = ()  # (disk spec, mode)
    snapshot_size: int = 1 << 30  # copy-on-write store per disk in snapshot mode (RAM, compressed)
    auth: bool = False  # DH-HMAC-CHAP: only hosts with the secret get in
    dhchap_secret: str = ""  # "" with auth: generate one
    dhchap_ctrl_secret: str = ""  # "generate", a secret, or "" for one-way authentication
    allow_hosts: tuple[str, ...] = ()  # host NQNs let in; none given with auth: make one up
    announce: bool = False  # publish _nvme-disc._tcp over mDNS (systemd-resolved)
    tls: bool = False  # NVMe/TCP over TLS 1.3 with a pre-shared key
    tls_key: str = ""  # "" with tls: generate one
    realtime: bool = False  # once started, serve disk events at real-time priority (SCHED_RR)

    def mode_for(self, disk: Disk) -> Mode:
        for spec, mode in self.disk_modes:
            if disk.matches(spec):
                return mode
        return self.mode


def parse_modes(value: str, settings: Settings) -> Settings:
    """`ro`, or `ro,sdb=rw,SERIAL=snapshot`: a default mode and/or per-disk modes."""
    mode, per_disk = settings.mode, list(settings.disk_modes)
    for item in filter(None, value.split(",")):
        spec, sep, name = item.rpartition("=")
        try:
            parsed = Mode.parse(name)
        except ValueError as exc:
            raise OptionError(f"{exc}; per disk: DISK=MODE") from None
        if sep:
            per_disk.append((spec, parsed))
        else:
            mode = parsed
    return replace(settings, mode=mode, disk_modes=tuple(per_disk))


def _disks(value: str, settings: Settings) -> Settings:
    specs = tuple(s for s in value.split(",") if s)
    if not specs:
        raise OptionError("expects 'all', 'none' or a comma-separated list of disks "
                          "(/dev/sdX, by-id name or serial)")  # fmt: skip
    if specs == ("all",):
        return replace(settings, all_disks=True, devices=())
    if specs == ("none",):
        return replace(settings, all_disks=False, devices=())
    if "all" in specs or "none" in specs:
        raise OptionError("'all' and 'none' cannot be combined with disk names")
    return replace(settings, all_disks=False, devices=specs)


def _nqn(value: str, settings: Settings) -> Settings:
    try:
        return replace(settings, nqn_base=check_nqn_prefix(value))
    except Exception as exc:
        raise OptionError("expects an NQN prefix like nqn.2024-01.com.example:lab") from exc


def parse_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise OptionError(f"expects a TCP port number 1-65535, not {value!r}")
    return int(value)


def _port(value: str, settings: Settings) -> Settings:
    return replace(settings, port=parse_port(value))


def parse_snapshot_size(value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if size < 1 << 20:
        raise OptionError(f"snapshot size {value!r} is below 1M")
    return size


def _snapshot_size(value: str, settings: Settings) -> Settings:
    return replace(settings, snapshot_size=parse_snapshot_size(value))


@dataclass(frozen=True)
class KernelOption:
    name: str
    apply: Callable[[str, Settings], Settings]
    help: str


def _yes(value: str) -> bool | None:
    return {"1": True, "yes": True, "on": True, "true": True, "0": False, "no": False, "off": False,
            "false": False}.get(value.lower())  # fmt: skip


def _flag_or_key(value: str, check: Callable[[str], str], expects: str) -> bool | str:
    """`1`/`0` (and their spellings) as a flag, or else a key that `check` accepts."""
    flag = _yes(value)
    if flag is not None:
        return flag
    try:
        return check(value)
    except UsageError:
        raise OptionError(expects) from None


def _auth(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, check_secret, "expects 1, 0 or a DHHC-1:00:…: secret (nvme gen-dhchap-key)")
    return replace(settings, auth=got) if isinstance(got, bool) else replace(settings, auth=True, dhchap_secret=got)


def _auth_ctrl(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, lambda v: check_secret(v, "controller secret"), "expects 1, 0 or a DHHC-1:00:…: secret")
    if isinstance(got, bool):
        got = "generate" if got else ""
    return replace(settings, dhchap_ctrl_secret=got)


def _allow_hosts(value: str, settings: Settings) -> Settings:
    hosts = tuple(h for h in value.split(",") if h)
    bad = [h for h in hosts if not valid_nqn(h)]
    if bad or not hosts:
        raise OptionError(f"expects host NQNs separated by commas; not an NQN: {', '.join(bad) or '(empty)'}")
    return replace(settings, auth=True, allow_hosts=hosts)


def _tls(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, check_key, "expects 1, 0 or a NVMeTLSkey-1:01:…: key (nvme gen-tls-key)")
    return replace(settings, tls=got) if isinstance(got, bool) else replace(settings, tls=True, tls_key=got)


def _announce(value: str, settings: Settings) -> Settings:
    flag = _yes(value)
    if flag is None:
        raise OptionError("expects 1 or 0")
    return replace(settings, announce=flag)


KERNEL_OPTIONS = (
    KernelOption("disks", _disks, "all (default), none, or disks to export: sda,nvme0n1,SERIAL,by-id name"),
    KernelOption("nqn", _nqn, "NQN prefix; each disk's NQN is PREFIX.<disk identity>"),
    KernelOption("port", _port, "TCP port for I/O (default 4420); discovery stays on 8009"),
    KernelOption("mode", parse_modes, "rw (default), ro or snapshot; per disk: ro,sdb=rw,SERIAL=snapshot"),
    KernelOption("snapshot_size", _snapshot_size, "copy-on-write RAM per disk in snapshot mode (default 1G)"),
    KernelOption("auth", _auth, "1 to require DH-HMAC-CHAP with a generated secret, or the secret itself"),
    KernelOption("auth_ctrl", _auth_ctrl, "1 or a secret: bidirectional authentication (the target proves itself)"),
    KernelOption("allow_hosts", _allow_hosts, "host NQNs allowed to connect (comma-separated); implies auth"),
    KernelOption("tls", _tls, "1 to require TLS 1.3 with a generated pre-shared key, or the key itself"),
    KernelOption("announce", _announce, "0: do not announce the discovery service over mDNS (the image announces)"),
)


def apply_kernel_cmdline(settings: Settings, cmdline: str) -> tuple[Settings, list[str]]:
    """Apply storagetm.* options; return the new settings and one message per bad option.
    A bad option is ignored; the others still apply."""
    options = {opt.name: opt for opt in KERNEL_OPTIONS}
    problems: list[str] = []
    try:
        words = shlex.split(cmdline)
    except ValueError:
        words = cmdline.split()
    for word in words:
        if not word.startswith(PREFIX):
            continue
        key, sep, value = word[len(PREFIX) :].partition("=")
        option = options.get(key)
        if option is None:
            known = ", ".join(PREFIX + name for name in options)
            problems.append(f"unknown kernel option {PREFIX}{key}, ignoring it (known: {known})")
            continue
        if not sep:
            problems.append(f"{PREFIX}{key} needs a value: {PREFIX}{key}=… ({option.help})")
            continue
        try:
            settings = option.apply(value, settings)
        except OptionError as exc:
            problems.append(f"invalid {PREFIX}{key}={value!r}, ignoring it: {exc}")
    return settings, problems


def read_kernel_cmdline(path: Path = Path("/proc/cmdline")) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
