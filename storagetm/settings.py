"""What the daemon is asked to do, from the command line and the kernel command line.

Each kernel command line option is declared once (name, converter, help) in
KERNEL_OPTIONS; `storagetm --help-kernel-cmdline` and the README table come from it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from storagetm.auth import CREDENTIAL_CTRL_SECRET, CREDENTIAL_SECRET, check_secret
from storagetm.disks import Disk
from storagetm.errors import UsageError
from storagetm.identity import check_nqn_prefix, valid_nqn
from storagetm.model import IO_TRSVCID
from storagetm.modes import Mode, parse_size
from storagetm.tls import CREDENTIAL_KEY, check_key

PREFIX = "storagetm."
SNAPSHOT_SIZE_MAX = (1 << 63) - 1  # bytes: the largest file (loff_t) a store can be
KERNEL_WHITESPACE = frozenset(" \t\n\v\f\r")  # the kernel's isspace(); not Unicode's spaces


class OptionError(ValueError):
    """A bad option value; the message says what the option expects, never a secret's value."""


@dataclass(frozen=True)
class Settings:
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
    refusals: tuple[str, ...] = ()  # bad options that limit access; while there are any, nothing is exported

    def mode_for(self, disk: Disk) -> Mode:
        if self.mode_unsure:
            return Mode.READ_ONLY
        return next((mode for spec, mode in self.disk_modes if disk.matches(spec)), self.mode)


def _mode_item(item: str) -> tuple[str | None, Mode]:
    """One item of a mode list: (None, mode) for the default, (disk, mode) for one disk."""
    spec, sep, name = item.rpartition("=")
    if sep and not spec:
        raise OptionError("per disk: DISK=MODE, and the disk is missing")
    try:
        return (spec if sep else None), Mode.parse(name)
    except ValueError as exc:
        raise OptionError(f"{exc}; per disk: DISK=MODE") from None


def _with_mode(settings: Settings, spec: str | None, mode: Mode) -> Settings:
    if spec is None:
        return replace(settings, mode=mode)
    return replace(settings, disk_modes=(*settings.disk_modes, (spec, mode)))


def parse_modes(value: str, settings: Settings) -> Settings:
    """`ro`, or `ro,sdb=rw,SERIAL=snapshot`: a default mode and/or per-disk modes. The first
    bad item raises OptionError."""
    items = [item for item in value.split(",") if item]
    if not items:
        raise OptionError("expects rw, ro or snapshot; per disk: DISK=MODE")
    for item in items:
        settings = _with_mode(settings, *_mode_item(item))
    return settings


def _modes_failing_closed(_name: str, value: str, settings: Settings) -> tuple[Settings, str]:
    """A bad mode list: its good items still apply; a bad per-disk mode makes that disk
    read-only, a bad (or missing) default every disk, whatever the other items say."""
    unsure: list[str] = []
    for item in [item for item in value.split(",") if item] or [""]:
        try:
            settings = _with_mode(settings, *_mode_item(item))
        except OptionError:
            spec = item.rpartition("=")[0]
            if spec:  # before the disk's other modes: the first match counts
                settings = replace(settings, disk_modes=((spec, Mode.READ_ONLY), *settings.disk_modes))
                unsure.append(spec)
            else:
                settings = replace(settings, mode=Mode.READ_ONLY, mode_unsure=True)
    if settings.mode_unsure:
        return settings, "exporting every disk read-only"
    return settings, f"exporting {', '.join(map(_printable, unsure))} read-only"


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
    except UsageError as exc:
        raise OptionError(f"{exc.message}; expects an NQN prefix like nqn.2024-01.com.example:lab") from None


def parse_port(value: str) -> int:
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= 65535:
        raise OptionError("expects a TCP port number 1-65535")
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
    # Whether it fits this machine's RAM is only known at export time (modes.check_room).
    if size > SNAPSHOT_SIZE_MAX:
        raise OptionError(f"snapshot size {value!r} is above 8E, more than a file can hold; "
                          "the store is in RAM: give e.g. 512M or 2G")  # fmt: skip
    return size


def _snapshot_size(value: str, settings: Settings) -> Settings:
    return replace(settings, snapshot_size=parse_snapshot_size(value))


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
    except UsageError as exc:
        raise OptionError(f"{exc.message}; {expects}") from None


# `0` of auth, auth_ctrl and tls is their default: it never turns off what another option
# or the command line turned on (the stricter of two contradicting options wins).


def _auth(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, check_secret, "expects 1, 0 or a DHHC-1:00:…: secret (nvme gen-dhchap-key)")
    if isinstance(got, bool):
        return replace(settings, auth=settings.auth or got)
    return replace(settings, auth=True, dhchap_secret=got)


def _auth_ctrl(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, lambda v: check_secret(v, "controller secret"), "expects 1, 0 or a DHHC-1:00:…: secret")
    if got is False:
        return settings
    ctrl_secret = (settings.dhchap_ctrl_secret or "generate") if got is True else got
    return replace(settings, auth=True, dhchap_ctrl_secret=ctrl_secret)


def _allow_hosts(value: str, settings: Settings) -> Settings:
    hosts = tuple(h for h in value.split(",") if h)
    bad = [h for h in hosts if not valid_nqn(h)]
    if bad or not hosts:
        shown = ", ".join(repr(h[:80]) for h in bad[:3]) or "(none given)"
        raise OptionError(f"expects host NQNs separated by commas; not an NQN: {shown}")
    return replace(settings, auth=True, allow_hosts=hosts)


def _tls(value: str, settings: Settings) -> Settings:
    got = _flag_or_key(value, check_key, "expects 1, 0 or a NVMeTLSkey-1:01:…: key (nvme gen-tls-key)")
    if isinstance(got, bool):
        return replace(settings, tls=settings.tls or got)
    return replace(settings, tls=True, tls_key=got)


def _announce(value: str, settings: Settings) -> Settings:
    flag = _yes(value)
    if flag is None:
        raise OptionError("expects 1 or 0")
    return replace(settings, announce=flag)


def _keep_default(_name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    """For options that do not limit access or writes: the value is ignored."""
    return settings, "using the default"


def _refuse(name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    """For options that limit who gets in or what is exported: nothing is exported."""
    return replace(settings, refusals=(*settings.refusals, PREFIX + name)), "exporting nothing"


def _not_announcing(_name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    return replace(settings, announce=False), "not announcing"


@dataclass(frozen=True)
class KernelOption:
    name: str
    apply: Callable[[str, Settings], Settings]  # raises OptionError for a bad value
    help: str
    # What a bad value does instead: the settings it leaves and what that means on the screen.
    # Never wider access than the option asked for.
    on_bad: Callable[[str, str, Settings], tuple[Settings, str]] = _keep_default
    secret: bool = False  # its value is never shown


KERNEL_OPTIONS = (
    KernelOption("disks", _disks, "all (default), none, or disks to export: sda,nvme0n1,SERIAL,by-id name", _refuse),
    KernelOption("nqn", _nqn, "NQN prefix; each disk's NQN is PREFIX.<disk identity>"),
    KernelOption("port", _port, "TCP port for I/O (default 4420); discovery stays on 8009"),
    KernelOption("mode", parse_modes, "rw (default), ro or snapshot; per disk: ro,sdb=rw,SERIAL=snapshot",
                 _modes_failing_closed),  # fmt: skip
    KernelOption("snapshot_size", _snapshot_size,
                 "copy-on-write RAM per disk in snapshot mode (default 1G, less if RAM is short)"),  # fmt: skip
    KernelOption("auth", _auth, "1 to require DH-HMAC-CHAP with a generated secret, or the secret itself",
                 _refuse, secret=True),  # fmt: skip
    KernelOption("auth_ctrl", _auth_ctrl, "1 or a secret: bidirectional authentication (the target proves "
                 "itself); implies auth", _refuse, secret=True),  # fmt: skip
    KernelOption("allow_hosts", _allow_hosts, "host NQNs allowed to connect (comma-separated); implies auth",
                 _refuse),  # fmt: skip
    KernelOption("tls", _tls, "1 to require TLS 1.3 with a generated pre-shared key, or the key itself",
                 _refuse, secret=True),  # fmt: skip
    KernelOption("announce", _announce, "0: do not announce the discovery service over mDNS (the image announces)",
                 _not_announcing),  # fmt: skip
)


def _shown(value: str, limit: int = 40) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def _printable(text: str) -> str:
    """Text as typed if it is safe to draw (no control characters, not a screen long), else quoted."""
    return text if text.isprintable() and len(text) <= 40 else _shown(text)


def _option_name(typed: str) -> str:
    return PREFIX + _printable(typed)


def _apply_option(option: KernelOption, typed: str, value: str | None, settings: Settings) -> tuple[Settings, str]:
    """`settings` with one option applied, and "" or the line that says what was wrong
    with it, what storagetm does instead, and what to do."""
    try:
        if value is None:
            raise OptionError(option.help)
        return option.apply(value, settings), ""
    except OptionError as exc:
        settings, outcome = option.on_bad(option.name, value or "", settings)
        if value is None:
            what = f"{_option_name(typed)} needs a value"
        elif option.secret:
            what = f"{_option_name(typed)} is not valid"
        else:
            what = f"{_option_name(typed)}={_shown(value)} is not valid"
        return settings, f"{what}: {exc} — {outcome}; fix the boot option"


def _unknown(typed: str) -> str:
    """Its value is not shown: it may be a secret under a mistyped name (storagetm.atuh=)."""
    names = [opt.name for opt in KERNEL_OPTIONS]
    close = difflib.get_close_matches(typed.replace("-", "_"), names, n=1)
    known = f"did you mean {PREFIX}{close[0]}?" if close else "known: " + ", ".join(names)
    return f"unknown option {_option_name(typed)} ({known}) — exporting nothing; fix or remove it"


def apply_kernel_cmdline(settings: Settings, cmdline: str) -> tuple[Settings, list[str]]:
    """Apply storagetm.* options; return the new settings and one line per bad option.

    Fail closed: no bad value widens access (KernelOption.on_bad says what each does). An
    unknown storagetm.* option exports nothing until it is fixed: it may be a mistyped
    option that limits access, and exporting read-only would still show every disk to
    anyone (storagetm.atuh=1, storagetm.dsiks=sdb), so only exporting nothing is safe for
    all of them. `-` and `_` in names are alike, as in systemd (snapshot-size, snapshot_size)."""
    options = {opt.name: opt for opt in KERNEL_OPTIONS}
    problems: list[str] = []
    for word in split_kernel_cmdline(cmdline):
        if not word.startswith(PREFIX):
            continue
        typed, sep, value = word[len(PREFIX) :].partition("=")
        option = options.get(typed.replace("-", "_"))
        if option is None:
            settings = replace(settings, refusals=(*settings.refusals, _option_name(typed)))
            problem = _unknown(typed)
        else:
            settings, problem = _apply_option(option, typed, value if sep else None, settings)
        if problem:
            problems.append(problem)
    return settings, problems


def split_kernel_cmdline(cmdline: str) -> list[str]:
    """Words as the kernel and systemd see them: split at whitespace outside double quotes;
    each `"` toggles quoting and is dropped (`a="b c"` is `a=b c`). Apostrophes and
    backslashes are ordinary characters (`systemd.hostname=bob's` is one word)."""
    words: list[str] = []
    word: list[str] | None = None  # None: between words
    quoted = False
    for char in cmdline:
        if char in KERNEL_WHITESPACE and not quoted:
            if word is not None:
                words.append("".join(word))
            word = None
            continue
        if word is None:
            word = []
        if char == '"':
            quoted = not quoted
        else:
            word.append(char)
    if word is not None:
        words.append("".join(word))
    return words


def read_kernel_cmdline(path: Path = Path("/proc/cmdline")) -> str:
    try:
        return path.read_text(errors="replace")  # a stray non-UTF-8 byte must not stop the daemon
    except OSError:
        return ""


def with_credentials(settings: Settings, read: Callable[[str], str]) -> Settings:
    """A secret or key given as a systemd credential turns its protection on, as the option
    would: a credential meant to protect the disks must never be ignored (fail closed)."""
    if read(CREDENTIAL_SECRET):
        settings = replace(settings, auth=True)
    if read(CREDENTIAL_CTRL_SECRET):
        settings = replace(settings, auth=True, dhchap_ctrl_secret=settings.dhchap_ctrl_secret or "generate")
    if read(CREDENTIAL_KEY):
        settings = replace(settings, tls=True)
    return settings
