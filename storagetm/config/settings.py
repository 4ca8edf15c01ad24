"""What the daemon is asked to do (`Settings`), and the converters that turn an option's text
into its value: one per kind of value, shared by the command line and the kernel command line.
Which option takes which converter is declared once, in storagetm.config.options."""

from __future__ import annotations

import re
from collections.abc import Callable

from msgspec import Struct
from msgspec.structs import replace

from storagetm.backing.modes import Mode, parse_size
from storagetm.disks.disk import Disk, resolve_file
from storagetm.disks.identity import NO_OVERRIDES, NvmeOverrides, check_nqn_prefix, valid_nqn
from storagetm.errors import UsageError
from storagetm.model import IO_TRSVCID, WEB_PORT
from storagetm.security.auth import check_secret, secret_argument
from storagetm.security.tls import check_key, key_argument

SNAPSHOT_SIZE_MAX = (1 << 63) - 1  # bytes: the largest file (loff_t) a store can be
ModeItems = tuple[tuple[str | None, Mode], ...]  # (disk spec or None for the default, mode)


class OptionError(ValueError):
    """A bad option value; the message says what the option expects, never a secret's value."""


class Settings(Struct, frozen=True):
    all_disks: bool = False  # --all: every eligible disk, now and hotplugged later
    lift_guards: bool = False  # --all twice: root disk and boot medium too
    devices: tuple[str, ...] = ()  # explicit DEVICE/FILE arguments or storagetm.disks=
    nqn_base: str | None = None
    port: int = IO_TRSVCID
    mode: Mode = Mode.READ_WRITE  # for every disk without a per-disk mode
    disk_modes: tuple[tuple[str, Mode], ...] = ()  # (disk spec, mode); the first that matches counts
    mode_unsure: bool = False  # a bad default mode was given: every disk read-only, whatever else says
    snapshot_size: int = 0  # copy-on-write store per disk in snapshot mode (RAM); 0: 1G, less if RAM is short
    auth: bool = False  # DH-HMAC-CHAP: only hosts with the secret get in
    dhchap_secret: str = ""  # "" with auth: generate one
    dhchap_ctrl_secret: str = ""  # "generate", a secret, or "" for one-way authentication
    allow_hosts: tuple[str, ...] = ()  # host NQNs let in; none given with auth: make one up
    announce: bool = False  # publish _nvme-disc._tcp over mDNS (systemd-resolved)
    tls: bool = False  # NVMe/TCP over TLS 1.3 with a pre-shared key
    tls_key: str = ""  # "" with tls: generate one
    realtime: bool = False  # once started, serve disk events at real-time priority (SCHED_RR)
    iscsi: bool = True  # every export also an iSCSI target (kernel LIO), for Windows' initiator
    web: bool = True  # the web page: status, instructions, the disks as downloads (not with TLS on)
    web_downloads: bool = False  # the disks as downloads even with TLS on: asked for explicitly
    web_port: int = WEB_PORT
    refusals: tuple[str, ...] = ()  # bad options that limit access; while there are any, nothing is exported
    nvme: NvmeOverrides = NO_OVERRIDES  # SYSTEMD_NVME_* from the environment

    def mode_for(self, disk: Disk) -> Mode:
        if self.mode_unsure:
            return Mode.READ_ONLY
        return next((mode for spec, mode in self.disk_modes if disk.matches(spec)), self.mode)

    def identity_overrides(self) -> NvmeOverrides:
        """A serial or UUID override names one disk: given to several, the Linux initiator would
        refuse all but the first ("globally duplicate IDs"), so it applies only while exactly
        one disk is named; model and firmware apply to every disk, as upstream."""
        return self.nvme if not self.all_disks and len(self.devices) == 1 else self.nvme.shared()


# Converters: the text of an option to its value, or OptionError.


def parse_flag(value: str) -> bool:
    flag = _yes(value)
    if flag is None:
        raise OptionError("expects 1 or 0")
    return flag


def _yes(value: str) -> bool | None:
    return {"1": True, "yes": True, "on": True, "true": True, "0": False, "no": False, "off": False,
            "false": False}.get(value.lower())  # fmt: skip


def parse_port(value: str) -> int:
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise OptionError("expects a TCP port number 1-65535")
    return int(value)


def parse_nqn_prefix(value: str) -> str:
    try:
        return check_nqn_prefix(value)
    except UsageError as exc:
        raise OptionError(f"{exc.message}; expects an NQN prefix like nqn.2024-01.com.example:lab") from None


def parse_snapshot_size(value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if size < 1 << 20:
        raise OptionError(f"snapshot size {value!r} is below 1M")
    # Whether it fits this machine's RAM is only known at export time (modes.check_room).
    if size > SNAPSHOT_SIZE_MAX:
        raise OptionError(f"snapshot size {value!r} is above 8E, more than a file can hold; "
                          "the store is in RAM: give e.g. 512M or 2G")  # fmt: skip
    return size


def parse_mode_item(item: str) -> tuple[str | None, Mode]:
    """One item of a mode list: (None, mode) for the default, (disk, mode) for one disk."""
    spec, sep, name = item.rpartition("=")
    if sep and not spec:
        raise OptionError("per disk: DISK=MODE, and the disk is missing")
    try:
        return (spec if sep else None), Mode.parse(name)
    except ValueError as exc:
        raise OptionError(f"{exc}; per disk: DISK=MODE") from None


def parse_mode_items(value: str) -> ModeItems:
    """`ro`, or `ro,sdb=rw,SERIAL=snapshot`: a default mode and/or per-disk modes."""
    items = [item for item in value.split(",") if item]
    if not items:
        raise OptionError("expects rw, ro or snapshot; per disk: DISK=MODE")
    return tuple(parse_mode_item(item) for item in items)


def with_mode(settings: Settings, spec: str | None, mode: Mode) -> Settings:
    if spec is None:
        return replace(settings, mode=mode)
    return replace(settings, disk_modes=(*settings.disk_modes, (spec, mode)))


def parse_modes(value: str, settings: Settings) -> Settings:
    """`settings` with a mode list applied; the first bad item raises OptionError."""
    for spec, mode in parse_mode_items(value):
        settings = with_mode(settings, spec, mode)
    return settings


def parse_disks(value: str) -> tuple[str, ...]:
    """`all`, `none`, or disk names (as ("all",), ("none",) or the names)."""
    specs = tuple(s for s in value.split(",") if s)
    if not specs:
        raise OptionError("expects 'all', 'none' or a comma-separated list of disks "
                          "(/dev/sdX, by-id name or serial)")  # fmt: skip
    if len(specs) > 1 and ("all" in specs or "none" in specs):
        raise OptionError("'all' and 'none' cannot be combined with disk names")
    return specs


def parse_device(value: str) -> str:
    # Files by their real path: named through a symlink or a relative path, they still match.
    return resolve_file(value) or value


def parse_hosts(value: str) -> tuple[str, ...]:
    hosts = tuple(h for h in value.split(",") if h)
    bad = [h for h in hosts if not valid_nqn(h)]
    if bad or not hosts:
        shown = ", ".join(repr(h[:80]) for h in bad[:3]) or "(none given)"
        raise OptionError(f"expects host NQNs separated by commas; not an NQN: {shown}")
    return hosts


def _checked(check: Callable[[str], str], value: str, expects: str = "") -> str:
    """What `check` makes of `value`, its UsageError as an OptionError."""
    try:
        return check(value)
    except UsageError as exc:
        raise OptionError(f"{exc.message}; {expects}" if expects else exc.one_line()) from None


def parse_secret(value: str) -> str:
    """A DH-HMAC-CHAP secret, or `@FILE` that holds one."""
    return _checked(secret_argument, value)


def parse_ctrl_secret(value: str) -> bool | str:
    """`generate` (True), or a controller secret or `@FILE` that holds one."""
    return True if value == "generate" else _checked(lambda v: secret_argument(v, "controller secret"), value)


def parse_key(value: str) -> str:
    """A TLS pre-shared key, or `@FILE` that holds one."""
    return _checked(key_argument, value)


def _flag_or(value: str, check: Callable[[str], str], expects: str) -> bool | str:
    """`1`/`0` (and their spellings) as a flag, or else what `check` accepts."""
    flag = _yes(value)
    return flag if flag is not None else _checked(check, value, expects)


def parse_auth(value: str) -> bool | str:
    return _flag_or(value, check_secret, "expects 1, 0 or a DHHC-1:00:…: secret (nvme gen-dhchap-key)")


def parse_auth_ctrl(value: str) -> bool | str:
    return _flag_or(value, lambda v: check_secret(v, "controller secret"), "expects 1, 0 or a DHHC-1:00:…: secret")


def parse_web(value: str) -> bool | str:
    """1, 0, or `downloads`: the page with the disks as downloads even with TLS on."""
    if value.lower() == "downloads":
        return "downloads"
    flag = _yes(value)
    if flag is None:
        raise OptionError("expects 1, 0 or downloads")
    return flag


def parse_tls(value: str) -> bool | str:
    return _flag_or(value, check_key, "expects 1, 0 or a NVMeTLSkey-1:01:…: key (nvme gen-tls-key)")
