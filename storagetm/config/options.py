"""Every option, declared once: its command line spelling, its kernel command line name
(`storagetm.NAME=`), its converter, its help, the credential that may hold its secret, and
what a bad value on the kernel command line does instead (fail closed).

The argument parser, the kernel command line parser, `--help`, `--help-kernel-cmdline` and
the README's option table are all made from OPTIONS:
`python3 -m storagetm.config.options --markdown` prints the README table.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from msgspec import Struct
from msgspec.structs import replace

from storagetm.backing.modes import Mode
from storagetm.config.settings import (
    ModeItems,
    OptionError,
    Settings,
    parse_auth,
    parse_auth_ctrl,
    parse_ctrl_secret,
    parse_device,
    parse_disks,
    parse_flag,
    parse_hosts,
    parse_key,
    parse_mode_item,
    parse_mode_items,
    parse_nqn_prefix,
    parse_port,
    parse_secret,
    parse_snapshot_size,
    parse_tls,
    parse_web,
    with_mode,
)
from storagetm.security.auth import CREDENTIAL_CTRL_SECRET, CREDENTIAL_SECRET
from storagetm.security.tls import CREDENTIAL_KEY

PREFIX = "storagetm."
KERNEL_WHITESPACE = frozenset(" \t\n\v\f\r")  # the kernel's isspace(); not Unicode's spaces
README_BEGIN, README_END = "<!-- options:begin -->", "<!-- options:end -->"
T = TypeVar("T")
# What a bad kernel option value does instead: the settings it leaves, and what that means on
# the screen. Never wider access than the option asked for.
OnBad = Callable[[str, str, Settings], tuple[Settings, str]]


class Secret(enum.Enum):
    NO = "no"
    VALUE = "value"  # the value may be a secret itself: it is never shown
    FILE = "file"  # on the kernel command line only `@FILE`, so the secret is not there for all to read


class Credential(Struct, frozen=True):
    """A systemd credential that holds the option's secret; being there turns its protection on."""

    name: str
    turn_on: Callable[[Settings], Settings]


class Option(Struct, Generic[T], frozen=True):
    help: str
    parse: Callable[[str], T]  # raises OptionError
    apply: Callable[[Settings, T], Settings]
    flag: str = ""  # "--port"; "" for none, "DEVICE|FILE" with positional
    short: str = ""
    metavar: str = ""  # "" with a flag: a switch, which gives `const`
    const: str | None = None  # the value of a switch, or of an optional value left out
    kernel: str = ""  # "port" for storagetm.port=; "" for none
    kernel_value: str = ""  # how the kernel tables show its value
    on_bad: OnBad | None = None  # None: the default stays (for options that do not limit access)
    secret: Secret = Secret.NO
    credential: Credential | None = None
    positional: bool = False

    def spelling(self) -> str:
        """The command line form, as the tables show it."""
        if self.positional:
            return f"{self.flag}…"
        names = f"{self.short}, {self.flag}" if self.short else self.flag
        if not self.metavar:
            return names
        return f"{names}[={self.metavar}]" if self.const is not None else f"{names}={self.metavar}"


# Appliers: a converted value into the settings.


def _all(settings: Settings, on: bool) -> Settings:
    return replace(settings, all_disks=settings.all_disks or on,
                   lift_guards=settings.lift_guards or (settings.all_disks and on))  # fmt: skip


def _device(settings: Settings, spec: str) -> Settings:
    return replace(settings, devices=(*settings.devices, spec))


def _disks(settings: Settings, specs: tuple[str, ...]) -> Settings:
    if specs in (("all",), ("none",)):
        return replace(settings, all_disks=specs == ("all",), devices=())
    return replace(settings, all_disks=False, devices=specs)


def _modes(settings: Settings, items: ModeItems) -> Settings:
    for spec, mode in items:
        settings = with_mode(settings, spec, mode)
    return settings


# `0` of auth, auth_ctrl and tls is their default: it never turns off what another option
# or the command line turned on (the stricter of two contradicting options wins).


def _auth(settings: Settings, got: bool | str) -> Settings:
    if isinstance(got, bool):
        return replace(settings, auth=settings.auth or got)
    return replace(settings, auth=True, dhchap_secret=got)


def _auth_ctrl(settings: Settings, got: bool | str) -> Settings:
    if got is False:
        return settings
    ctrl_secret = (settings.dhchap_ctrl_secret or "generate") if got is True else got
    return replace(settings, auth=True, dhchap_ctrl_secret=str(ctrl_secret))


def _hosts(settings: Settings, hosts: tuple[str, ...]) -> Settings:
    added = tuple(h for h in hosts if h not in settings.allow_hosts)
    return replace(settings, auth=True, allow_hosts=(*settings.allow_hosts, *added))


def _tls(settings: Settings, got: bool | str) -> Settings:
    if isinstance(got, bool):
        return replace(settings, tls=settings.tls or got)
    return replace(settings, tls=True, tls_key=got)


def _setter(name: str) -> Callable[[Settings, Any], Settings]:
    return lambda settings, value: replace(settings, **{name: value})


# What a bad kernel option value does instead.


def _refuse(name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    """For options that limit who gets in or what is exported: nothing is exported."""
    return replace(settings, refusals=(*settings.refusals, PREFIX + name)), "exporting nothing"


def _not_announcing(_name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    return replace(settings, announce=False), "not announcing"


def _modes_failing_closed(_name: str, value: str, settings: Settings) -> tuple[Settings, str]:
    """A bad mode list: its good items still apply; a bad per-disk mode makes that disk
    read-only, a bad (or missing) default every disk, whatever the other items say."""
    unsure: list[str] = []
    for item in [item for item in value.split(",") if item] or [""]:
        try:
            settings = with_mode(settings, *parse_mode_item(item))
        except OptionError:
            spec = item.rpartition("=")[0]
            if spec:  # before the disk's other modes: the first match counts
                settings = replace(settings, disk_modes=((spec, Mode.READ_ONLY), *settings.disk_modes))
                unsure.append(spec)
            else:
                settings = replace(settings, mode=Mode.READ_ONLY, mode_unsure=True)
    if settings.mode_unsure:
        return settings, "exporting every disk read-only"
    return settings, f"exporting {', '.join(map(printable_name, unsure))} read-only"


def _no_iscsi(_name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    return replace(settings, iscsi=False), "not offering iSCSI"


def _no_web(_name: str, _value: str, settings: Settings) -> tuple[Settings, str]:
    return replace(settings, web=False), "not serving the web page"


def _web(settings: Settings, value: bool | str) -> Settings:
    if value == "downloads":
        return replace(settings, web=True, web_downloads=True)
    return replace(settings, web=bool(value))


def _on(apply: Callable[[Settings, bool | str], Settings]) -> Callable[[Settings], Settings]:
    return lambda settings: apply(settings, True)


_MODE_HELP = "rw (default), ro or snapshot, for every disk or per disk (path, by-id name or serial): ro,sdb=rw"
_FILE = "@FILE"

OPTIONS: tuple[Option[Any], ...] = (
    Option("block devices (path, by-id name or serial) or regular files to export; at boot: storagetm.disks=",
           parse_device, _device, flag="DEVICE|FILE", positional=True),  # fmt: skip
    Option("export every disk, now and hotplugged later; twice: also the root disk, the boot medium and disks "
           "in use (mounted, swap)", parse_flag, _all, flag="--all", short="-a", const="1"),  # fmt: skip
    Option("all (default), none, or the disks to export: sda,nvme0n1,SERIAL,by-id name", parse_disks, _disks,
           kernel="disks", kernel_value="all|none|DISK,…", on_bad=_refuse),  # fmt: skip
    Option("NQN prefix (default: derived from this host); each disk's NQN is PREFIX.<disk identity>",
           parse_nqn_prefix, _setter("nqn_base"), flag="--nqn", metavar="PREFIX", kernel="nqn",
           kernel_value="PREFIX"),  # fmt: skip
    Option("TCP port for I/O (default 4420); discovery stays on 8009", parse_port, _setter("port"), flag="--port",
           metavar="N", kernel="port", kernel_value="N"),  # fmt: skip
    Option(_MODE_HELP, parse_mode_items, _modes, flag="--mode", metavar="[DISK=]MODE", kernel="mode",
           kernel_value="MODE[,DISK=MODE…]", on_bad=_modes_failing_closed),  # fmt: skip
    Option("export read-only: every write fails on the initiator (--mode=ro)", parse_mode_items, _modes,
           flag="--read-only", const="ro"),  # fmt: skip
    Option("writes go to a RAM copy-on-write store; the disks are never written (--mode=snapshot)",
           parse_mode_items, _modes, flag="--snapshot", const="snapshot"),  # fmt: skip
    Option("copy-on-write RAM per disk in snapshot mode (default 1G, less if RAM is short)", parse_snapshot_size,
           _setter("snapshot_size"), flag="--snapshot-size", metavar="SIZE", kernel="snapshot_size",
           kernel_value="SIZE"),  # fmt: skip
    Option("require NVMe in-band authentication (DH-HMAC-CHAP) with a generated secret (at boot: or this one)",
           parse_auth, _auth, flag="--auth", const="1", kernel="auth",
           kernel_value="1|0|DHHC-1:…", on_bad=_refuse, secret=Secret.VALUE),  # fmt: skip
    Option("this host secret; implies authentication", parse_secret, _auth, flag="--dhchap-secret",
           metavar="DHHC-1:…|@FILE", kernel="dhchap_secret", kernel_value=_FILE, on_bad=_refuse,
           secret=Secret.FILE, credential=Credential(CREDENTIAL_SECRET, _on(_auth))),  # fmt: skip
    Option("bidirectional authentication (the target proves itself too) with a generated secret or this one",
           parse_auth_ctrl, _auth_ctrl, kernel="auth_ctrl", kernel_value="1|0|DHHC-1:…",
           on_bad=_refuse, secret=Secret.VALUE),  # fmt: skip
    Option("bidirectional authentication with this controller secret (generated if none is given)",
           parse_ctrl_secret, _auth_ctrl, flag="--dhchap-ctrl-secret", metavar="DHHC-1:…|@FILE",
           const="generate", kernel="dhchap_ctrl_secret", kernel_value=_FILE, on_bad=_refuse, secret=Secret.FILE,
           credential=Credential(CREDENTIAL_CTRL_SECRET, _on(_auth_ctrl))),  # fmt: skip
    Option("host NQNs allowed to connect (repeatable, or comma-separated); implies authentication", parse_hosts, _hosts,
           flag="--allow-host", metavar="HOSTNQN", kernel="allow_hosts", kernel_value="NQN,…",
           on_bad=_refuse),  # fmt: skip
    Option("require NVMe/TCP over TLS 1.3 with a generated pre-shared key (at boot: or this one)", parse_tls,
           _tls, flag="--tls", const="1", kernel="tls", kernel_value="1|0|NVMeTLSkey-1:…", on_bad=_refuse,
           secret=Secret.VALUE),  # fmt: skip
    Option("this pre-shared key (NVMeTLSkey-1:01:…:, as nvme gen-tls-key makes it); implies TLS",
           parse_key, _tls, flag="--tls-key", metavar="KEY|@FILE", kernel="tls_key", kernel_value=_FILE,
           on_bad=_refuse, secret=Secret.FILE, credential=Credential(CREDENTIAL_KEY, _on(_tls))),  # fmt: skip
    Option("announce the discovery service over mDNS (_nvme-disc._tcp, via systemd-resolved); the image does",
           parse_flag, _setter("announce"), flag="--announce", const="1", kernel="announce", kernel_value="1|0",
           on_bad=_not_announcing),  # fmt: skip
    Option("each disk also as an iSCSI target (port 3260, for Windows; CHAP with authentication or TLS): on "
           "unless --no-iscsi or 0", parse_flag, _setter("iscsi"), flag="--no-iscsi", const="0", kernel="iscsi",
           kernel_value="1|0", on_bad=_no_iscsi),  # fmt: skip
    Option("the web page (status, instructions per OS, each disk as a download; plain HTTP): on unless --no-web "
           "or 0; with TLS on, no downloads unless `downloads`", parse_web, _web, flag="--no-web", const="0",
           kernel="web", kernel_value="1|0|downloads", on_bad=_no_web),  # fmt: skip
    Option("the disks as downloads on the web page even with TLS on (plain HTTP: anyone on the path reads them)",
           parse_web, _web, flag="--web-downloads", const="downloads"),  # fmt: skip
    Option("TCP port of the web page (default 80)", parse_port, _setter("web_port"), flag="--web-port", metavar="N",
           kernel="web_port", kernel_value="N"),  # fmt: skip
    Option("once started, handle disk events at real-time priority (SCHED_RR 1); the image does",
           parse_flag, _setter("realtime"), flag="--realtime", const="1", kernel="realtime",
           kernel_value="1|0"),  # fmt: skip
)


def kernel_options() -> dict[str, Option[Any]]:
    return {opt.kernel: opt for opt in OPTIONS if opt.kernel}


# The command line.

SETTINGS_DEST = "settings"  # the Settings that the options build, in command-line order


class _Given(argparse.Action):
    """Applies its option as it is met, so the command line, like the kernel command line,
    is applied in the order it is written (`--read-only --mode=rw` is read-write)."""

    def __init__(self, *args: Any, option: Option[Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option = option

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:  # fmt: skip
        texts = [values] if isinstance(values, str) else list(values or [])
        if not texts and not self.option.positional:
            texts = [str(self.const)]
        settings = getattr(namespace, SETTINGS_DEST, None) or Settings()
        for text in texts:
            try:
                value = self.option.parse(text)
            except OptionError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
            settings = self.option.apply(settings, value)
            setattr(namespace, self.dest, value)
        setattr(namespace, SETTINGS_DEST, settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        if not option.flag:
            continue
        if option.positional:
            names: list[str] = ["devices"]
            nargs: str | int | None = "*"
        else:
            names = [n for n in (option.short, option.flag) if n]
            nargs = None if option.const is None else ("?" if option.metavar else 0)
        parser.add_argument(*names, action=_Given, option=option, nargs=nargs, const=option.const,
                            metavar=option.metavar or (option.flag if option.positional else None),
                            help=option.help)  # fmt: skip


def settings_of(args: argparse.Namespace) -> Settings:
    settings = getattr(args, SETTINGS_DEST, None)
    return settings if isinstance(settings, Settings) else Settings()


# The kernel command line.


def _shown(value: str, limit: int = 40) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def printable_name(text: str) -> str:
    """Text as typed if it is safe to draw (no control characters, not a screen long), else quoted."""
    return text if text.isprintable() and len(text) <= 40 else _shown(text)


def _kernel_value(option: Option[Any], value: str) -> Any:
    if option.secret is Secret.FILE and not value.startswith("@"):
        credential = option.credential.name if option.credential else ""
        raise OptionError(f"takes @FILE, the file that holds it, so that it is not on the kernel command line for "
                          f"every user to read (or give the credential {credential})")  # fmt: skip
    return option.parse(value)


def _apply_word(option: Option[Any], typed: str, value: str | None, settings: Settings) -> tuple[Settings, str]:
    """`settings` with one option applied, and "" or the line that says what was wrong
    with it, what storagetm does instead, and what to do."""
    try:
        if value is None:
            raise OptionError(option.help)
        return option.apply(settings, _kernel_value(option, value)), ""
    except OptionError as exc:
        if option.on_bad is None:
            outcome = "using the default"
        else:
            settings, outcome = option.on_bad(option.kernel, value or "", settings)
        name = PREFIX + printable_name(typed)
        if value is None:
            what = f"{name} needs a value"
        elif option.secret is not Secret.NO:
            what = f"{name} is not valid"
        else:
            what = f"{name}={_shown(value)} is not valid"
        return settings, f"{what}: {exc} — {outcome}; fix the boot option"


def _unknown(typed: str, names: list[str]) -> str:
    """Its value is not shown: it may be a secret under a mistyped name (storagetm.atuh=)."""
    import difflib  # only for a mistyped option

    close = difflib.get_close_matches(typed.replace("-", "_"), names, n=1)
    known = f"did you mean {PREFIX}{close[0]}?" if close else "known: " + ", ".join(names)
    return f"unknown option {PREFIX}{printable_name(typed)} ({known}) — exporting nothing; fix or remove it"


def apply_kernel_cmdline(settings: Settings, cmdline: str) -> tuple[Settings, list[str]]:
    """Apply storagetm.* options; return the new settings and one line per bad option.

    Fail closed: no bad value widens access (Option.on_bad says what each does). An
    unknown storagetm.* option exports nothing until it is fixed: it may be a mistyped
    option that limits access, and exporting read-only would still show every disk to
    anyone (storagetm.atuh=1, storagetm.dsiks=sdb), so only exporting nothing is safe for
    all of them. `-` and `_` in names are alike, as in systemd (snapshot-size, snapshot_size)."""
    options = kernel_options()
    problems: list[str] = []
    for word in split_kernel_cmdline(cmdline):
        if not word.startswith(PREFIX):
            continue
        typed, sep, value = word[len(PREFIX) :].partition("=")
        option = options.get(typed.replace("-", "_"))
        if option is None:
            settings = replace(settings, refusals=(*settings.refusals, PREFIX + printable_name(typed)))
            problem = _unknown(typed, list(options))
        else:
            settings, problem = _apply_word(option, typed, value if sep else None, settings)
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
    for option in OPTIONS:
        if option.credential and read(option.credential.name):
            settings = option.credential.turn_on(settings)
    return settings


# The tables.


def kernel_help() -> str:
    """`storagetm --help-kernel-cmdline`: each boot option, its value and what it does."""
    rows = [(f"{PREFIX}{opt.kernel}={opt.kernel_value}", opt.help) for opt in OPTIONS if opt.kernel]
    width = max(len(name) for name, _ in rows)
    lines = ["storagetm reads these from the kernel command line (with --kernel-cmdline, as the image does);",
             "`-` and `_` are alike in names, and a bad value fails closed (see README.md):", ""]  # fmt: skip
    return "\n".join(lines + [f"  {name:<{width}}  {meaning}" for name, meaning in rows]) + "\n"


def markdown() -> str:
    """The README's option table."""
    def code(text: str) -> str:
        return f"`{text}`".replace("|", "\\|") if text else ""  # GitHub splits cells at | even in code

    lines = ["| boot option | command line | credential | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        kernel = code(f"{PREFIX}{opt.kernel}={opt.kernel_value}" if opt.kernel else "")
        cli = code(opt.spelling() if opt.flag else "")
        credential = code(opt.credential.name if opt.credential else "")
        meaning = opt.help.replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| {kernel} | {cli} | {credential} | {meaning} |")
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str) -> str:
    """`readme` with the text between the option markers made from OPTIONS."""
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"README has no {README_BEGIN} … {README_END}")
    return f"{head}{README_BEGIN}\n{markdown()}{README_END}{tail}"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m storagetm.config.options", description="Print the option tables.")
    parser.add_argument("--markdown", action="store_true", help="the README's option table")
    parser.add_argument("--update-readme", type=Path, metavar="README", help="rewrite its table in place")
    args = parser.parse_args(argv)
    if args.update_readme:
        args.update_readme.write_text(readme_with_table(args.update_readme.read_text()))
    elif args.markdown:
        sys.stdout.write(markdown())
    else:
        sys.stdout.write(kernel_help())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
