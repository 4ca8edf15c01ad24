"""The operator's screen: what to type on the other machine, and what is exported."""

from __future__ import annotations

import contextlib
import os
import re
import select
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from storagetm.backing.modes import Mode
from storagetm.connection import screen_lines as connection_code_lines
from storagetm.console.stats import DiskActivity
from storagetm.model import DISCOVERY_TRSVCID, IO_TRSVCID, Export, HashProgress
from storagetm.security.chap import CHAP_USER
from storagetm.state import RunState
from storagetm.system.log import Logger
from storagetm.text import human_size, printable
from storagetm.web.links import screen_lines as web_lines

log = Logger(__name__)

CLEAR = "\033[H\033[2J"
TITLE = "storagetm: target disk mode - disks exported over NVMe/TCP"
# Whether the firmware verified what booted: someone who had to turn Secure Boot off to boot
# this must turn it back on afterwards (BitLocker asks for its recovery key otherwise).
SECURE_BOOT: dict[bool | None, str] = {True: " (Secure Boot on)", False: " (Secure Boot off)", None: ""}
WIDTH = 80
STOP = "stop: Ctrl+C or `storagetm stop`"
ANYONE = "Anyone on the network"
WITH_SECRET = "Only an initiator with the host NQN and secret below"
WITH_TLS_KEY = "Only an initiator with the host NQN and TLS key below"
WARNINGS = {
    Mode.READ_WRITE: "{who} can READ AND WRITE {what}.",
    Mode.READ_ONLY: "{who} can READ {what}; writes are refused.",
    Mode.SNAPSHOT: "{who} can READ {what} and write to a RAM copy; the disks themselves are not changed.",
}
NOT_ENCRYPTED = "The traffic is not encrypted: others on the network can read the data in transit."
ENCRYPTED = "The traffic is encrypted (TLS 1.3): others on the network cannot read it."
ISCSI_NOT_ENCRYPTED = ("NVMe/TCP traffic is encrypted (TLS 1.3); iSCSI traffic (port 3260) is not: others on "
                       "the network can read what goes over iSCSI.")  # fmt: skip


def warnings(state: RunState) -> list[str]:
    """One plain sentence per mode in use: who can read and write which disks."""
    by_mode: dict[Mode, list[str]] = {}
    for export in state.exports.values():
        by_mode.setdefault(export.mode, []).append(export.disk.name)
    who = WITH_SECRET if state.auth.enabled else WITH_TLS_KEY if state.tls.enabled else ANYONE
    if state.tls.enabled:
        extra = [ISCSI_NOT_ENCRYPTED if state.iscsi.enabled else ENCRYPTED]
    else:
        extra = [NOT_ENCRYPTED] if state.auth.enabled else []
    if len(by_mode) <= 1:
        mode = next(iter(by_mode), Mode.READ_WRITE)
        return [WARNINGS[mode].format(who=who, what="these disks"), *extra]
    return [WARNINGS[mode].format(who=who, what=", ".join(sorted(names))) for mode, names in sorted(
        by_mode.items(), key=lambda item: item[0].value)] + extra  # fmt: skip


def mode_text(state: RunState, export: Export) -> str:
    if export.mode is not Mode.SNAPSHOT:
        return export.mode.label
    usage = state.snapshot_usage.get(export.nqn)
    if usage is None:
        return f"snapshot, {human_size(export.snapshot_size)} RAM" if export.snapshot_size else "snapshot"
    if usage.invalid:
        return "snapshot FULL: I/O now fails"
    return f"snapshot {usage.percent:.0f}% of {human_size(usage.total)} used"


def _connect_args(state: RunState, io_port: int) -> str:
    args = "" if io_port in (IO_TRSVCID, DISCOVERY_TRSVCID) else f" -s {io_port}"
    if state.auth.enabled:
        args += f" --hostnqn={state.auth.hosts[0]} --dhchap-secret={state.auth.secret}"
    elif state.tls.enabled:
        args += f" --hostnqn={state.tls.hosts[0]}"
    if state.tls.enabled:
        args += " --tls"
    return args


def fit_rows(lines: list[str], width: int = WIDTH) -> list[str]:
    """Split lines longer than the console is wide (commands with host NQN and keys) into
    rows of `width`, so that the in-place redraw can address every row: after a space where
    there is one (no word cut in two; the space stays, so the rows joined give the line back),
    else at `width` (a key longer than a row)."""
    rows: list[str] = []
    for line in lines:
        while len(line) > width:
            cut = line.rfind(" ", 0, width) + 1 or width
            rows.append(line[:cut])
            line = line[cut:]
        rows.append(line)
    return rows


def progress_bar(fraction: float, width: int = 24) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def activity_line(activity: DiskActivity) -> str:
    return (f"    {progress_bar(activity.read_fraction)} {activity.read_fraction * 100:3.0f}% read"
            f"  {human_size(int(activity.read_rate))}/s   written {human_size(activity.written_bytes)}")  # fmt: skip


def hash_line(progress: HashProgress, *, live: bool) -> str:
    """The row under a disk for its sha256 computed on the target: the whole digest once done
    (75 columns), for the operator to compare with the one the other machine got. While it
    runs, with `live` (the dashboard, redrawn in place) its bar and bytes; else its percentage
    only (plain output prints the whole screen again at every change)."""
    if progress.digest:
        return f"    sha256 {progress.digest}"
    if progress.error:
        line = f"    sha256 failed: {printable(progress.error)}"
        return line if len(line) <= WIDTH else line[: WIDTH - 1] + "…"
    percent = f"{progress.fraction * 100:3.0f}%"
    if not live:
        return f"    sha256 being computed: {percent.strip()}"
    return (f"    sha256 computing {progress_bar(progress.fraction)} {percent}"
            f"  {human_size(progress.done)} of {human_size(progress.size)}")  # fmt: skip


def disk_rows(state: RunState, number: int, export: Export, *, dashboard: bool, keys: bool) -> list[str]:
    """The disk's rows but its NQN's: its facts and mode; on the dashboard its I/O; its sha256."""
    disk = export.disk
    label = f"{number} {disk.name}" if keys and number < 10 else disk.name  # the number a key picks it by
    rows = [f"  {label:<10} {human_size(disk.size):>10}  {export.identity.model[:30]}"
            f"  {export.identity.serial}  [{mode_text(state, export)}]"]  # fmt: skip
    if dashboard and export.nqn in state.activity:
        rows.append(activity_line(state.activity[export.nqn]))
    if export.nqn in state.hashing:
        rows.append(hash_line(state.hashing[export.nqn], live=dashboard))
    return rows


def room_for(need: list[int], free: int, first: Sequence[int] = ()) -> list[int]:
    """Which disks (by index) fit in `free` rows, each taking `need[i]`, with a row left for
    "… and N more" when any is left out: those in `first` (a sha256 the operator compares)
    before the rest, in order; at least one. Returned in screen order."""
    chosen: list[int] = []
    used = 0
    for i in [*first, *(i for i in range(len(need)) if i not in first)]:
        more = 1 if len(chosen) + 1 < len(need) else 0
        if chosen and used + need[i] + more > free:
            break
        chosen.append(i)
        used += need[i]
    return sorted(chosen)


def connect_lines(state: RunState, io_port: int) -> list[str]:
    """What to type on the other machine to connect."""
    if not state.addresses:
        return ["No network address yet: plug in a cable (DHCP, or link-local on a cable)."]
    lines: list[str] = []
    if state.tls.enabled:
        # nvme-cli takes no key on connect: the keys go into the kernel keyring first.
        lines.append("On the other machine, as root, with tlshd (ktls-utils) running, first add the key")
        lines.append("for nqn.2014-08.org.nvmexpress.discovery and for each disk's NQN below:")
        lines.append(f"  nvme check-tls-key -i -n {state.tls.hosts[0]} -d {state.tls.key} -c NQN")
    lines.append("Then type one of:" if state.tls.enabled else "On the other machine, as root, type one of:")
    for address in state.addresses:
        lines.append(f"  nvme connect-all -t tcp -a {address.for_command}{_connect_args(state, io_port)}")
    if any(a.link_local and a.family == "ipv6" for a in state.addresses):
        lines.append("  (for fe80:: use the other machine's interface after % and -f if its name differs)")
    if state.auth.ctrl_secret:
        # nvme-cli's discovery commands take no controller secret: the target proves
        # itself only on `nvme connect`, one disk at a time.
        lines.append("  To have the target prove itself too, connect each disk (NQN below) with:")
        lines.append(f"  nvme connect -t tcp -a {state.addresses[0].for_command}{_connect_args(state, io_port)}"
                     f" --dhchap-ctrl-secret={state.auth.ctrl_secret} -n NQN")  # fmt: skip
    if len(state.auth.hosts) > 1:
        lines.append(f"  (allowed host NQNs: {', '.join(state.auth.hosts)})")
    return lines


def iscsi_lines(state: RunState) -> list[str]:
    """How Windows' built-in initiator connects (iSCSI), or why iSCSI is not offered."""
    iscsi = state.iscsi
    if iscsi.unavailable:
        return textwrap.wrap(f"iSCSI is unavailable: {iscsi.unavailable}", WIDTH, subsequent_indent="  ")
    if not iscsi.enabled or not state.addresses:
        return []
    address = next((a for a in state.addresses if a.family == "ipv4"), state.addresses[0])
    lines = [f"Windows: iSCSI Initiator → Quick Connect → {address.address}"]
    if iscsi.chap:
        lines.append("  then the target, Connect → Advanced → Enable CHAP log on:")
        lines.append(f"  name {CHAP_USER}, secret {iscsi.chap_secret}")
    if iscsi.chap_ctrl_secret:
        lines.append(f"  To check the target too: Configuration → CHAP → {iscsi.chap_ctrl_secret},")
        lines.append("  then Advanced → Perform mutual authentication")
    return lines


def alert_lines(state: RunState) -> list[str]:
    """Bad boot options, first on the screen: storagetm runs with less than was asked for
    (read-only, or nothing exported) until the operator fixes them."""
    lines = [row for alert in state.alerts for row in textwrap.wrap(f"!! {alert}", WIDTH, subsequent_indent="   ")]
    if state.refused:
        options = ", ".join(dict.fromkeys(state.refused))
        lines += textwrap.wrap(f"!! NOTHING IS EXPORTED: fix {options} on the kernel command line (edit the boot "
                               "entry) and boot again.", WIDTH, subsequent_indent="   ")  # fmt: skip
    return lines


def render(state: RunState, io_port: int = IO_TRSVCID, *, dashboard: bool = False, rows: int = 25,
           code: bool = True, keys: bool = False) -> str:  # fmt: skip
    """The operator's screen. With `dashboard`, also live I/O per disk and the initiators
    connected, trimmed to `rows` lines (80x25 by default); the connection code only if it
    fits there too. With `keys`, the keys line under it says how to stop, not this."""
    blank = [] if dashboard else [""]  # the dashboard has no room for empty lines
    lines = alert_lines(state)
    hidden_disks = False
    lines += [TITLE + SECURE_BOOT[state.secure_boot]]
    if not state.refused:  # with nothing exported, there is nothing to warn about or connect to
        lines += [wrapped for warning in warnings(state) for wrapped in textwrap.wrap(warning, WIDTH)]
        lines += blank
        lines += connect_lines(state, io_port)
        lines += connection_code_lines(state, WIDTH) if code else []  # for `storagetm connect`
        lines += iscsi_lines(state)
        lines += web_lines(state)
    if state.announced:
        lines.append(f"Announced over mDNS as {state.announced} (_nvme-disc._tcp, port {DISCOVERY_TRSVCID})")
    lines += blank
    if dashboard:
        lines = fit_rows(lines)
        lines.append(f"Initiators connected: {', '.join(state.initiators) or 'none'}")
    # "Not exported" and the problems under the disks; the dashboard leaves room for them.
    tail: list[str] = []
    if state.not_exported:
        skipped = ", ".join(f"{item['name']} ({item['reason']})" for item in state.not_exported)
        tail.append(f"Not exported: {skipped}")
    for problem in state.problems:
        tail += textwrap.wrap(f"! {problem}", WIDTH, subsequent_indent="  ")
    if dashboard:
        tail = fit_rows(tail)
    if state.exports:
        lines.append(f"Exported disks ({len(state.exports)}):" + (f"   ({STOP})" if dashboard and not keys else ""))
        exports = sorted(state.exports.values(), key=lambda e: e.disk.name)
        blocks = [disk_rows(state, number, export, dashboard=dashboard, keys=keys)
                  for number, export in enumerate(exports, 1)]  # fmt: skip
        # The rows left for the disks: under them the tail, then the stop hint (2 rows) or the keys line.
        free = rows - len(lines) - len(tail) - (0 if dashboard else 2) - (1 if keys else 0)
        # A disk's activity row comes with the dashboard's first sample: its room is kept from the start.
        need = [len(block) + (dashboard and e.nqn not in state.activity)
                for block, e in zip(blocks, exports, strict=True)]  # fmt: skip
        # Every disk before any disk's NQN row: the dashboard drops those first (status has them).
        with_nqn = not dashboard or sum(need) + len(exports) <= free
        hashed = [i for i, e in enumerate(exports) if e.nqn in state.hashing]
        shown = range(len(exports)) if with_nqn else room_for(need, free, first=hashed)
        for i in shown:
            lines += blocks[i] + ([f"    {exports[i].nqn}"] if with_nqn else [])
        hidden_disks = len(shown) < len(exports)
        if hidden_disks:
            lines.append(f"  … and {len(exports) - len(shown)} more: storagetm status")
    elif not state.refused:  # else the alert at the top says why
        lines.append("No disks exported yet.")
    lines += tail
    if not dashboard and not keys:
        lines += ["", STOP]
    elif code and (len(lines) > rows or hidden_disks) and connection_code_lines(state, WIDTH):
        # The disks before the code (`storagetm status --show-secrets` always has it).
        return render(state, io_port, dashboard=True, rows=rows, code=False, keys=keys)
    return "\n".join(lines) + "\n"


RESET = "\033[0m"
WARNING_COLOUR = "\033[1;31m"  # bold red: who can write, what is not encrypted, bad options
MODE_COLOURS = {"read-write": "\033[1;31m", "read-only": "\033[1;32m", "snapshot": "\033[1;33m"}
MODE_TAG = re.compile(r"\[((read-write|read-only|snapshot)[^\]]*)\]$")


def coloured(lines: list[str], warning_rows: set[str]) -> list[str]:
    """The dashboard's rows for a terminal: the warnings in bold red, each disk's mode in its
    colour (read-write red, read-only green, snapshot yellow; a full snapshot red). The
    escapes add no width: the rows stay within 80 columns."""
    out = []
    for line in lines:
        if line in warning_rows or line.startswith(("!! ", "! ")):
            line = f"{WARNING_COLOUR}{line}{RESET}"
        elif match := MODE_TAG.search(line):
            colour = WARNING_COLOUR if "FULL" in match.group(1) else MODE_COLOURS[match.group(2)]
            line = f"{line[: match.start(1)]}{colour}{match.group(1)}{RESET}]"
        out.append(line)
    return out


def warning_rows(state: RunState) -> set[str]:
    return {row for warning in warnings(state) for row in textwrap.wrap(warning, WIDTH)} if not state.refused else set()


def active_consoles(active: Path = Path("/sys/class/tty/console/active")) -> list[str]:
    """The kernel's consoles (console= on the kernel command line), as device paths."""
    try:
        names = active.read_text().split()
    except OSError:
        return []
    return [f"/dev/{name}" for name in names]


class Screen:
    """Draws the dashboard on console devices (terminals: redrawn in place, about once a
    second), or prints the plain screen to stdout, again only when it changes."""

    def __init__(self, consoles: Sequence[str] = (), *, terminal: bool | None = None) -> None:
        self.consoles = list(consoles)
        self.terminal = bool(self.consoles) if terminal is None else terminal
        self.last = ""
        self.drawn: list[str] | None = None  # lines on the consoles now; None: not drawn yet
        self.fds: dict[str, int] = {}
        self.panel: list[str] = []  # the keys line (console/panel.py), under the dashboard
        self.overlay: list[str] | None = None  # lines drawn instead of the dashboard (help, QR code)

    def set_panel(self, lines: Sequence[str], overlay: Sequence[str] | None = None) -> None:
        """What the next show() draws under the dashboard (wrapped at word ends), or instead of it."""
        self.panel = [row for line in lines for row in textwrap.wrap(line, WIDTH) or [""]]
        self.overlay = list(overlay) if overlay is not None else None

    def _changes(self, lines: list[str]) -> str:
        """Escape sequences that turn the drawn screen into `lines`: only changed lines are
        rewritten in place (no flicker, little work for a slow framebuffer or serial line);
        the first draw clears the boot messages away."""
        if self.drawn is None:
            # No line break after the last row: on a full 25-row screen it would scroll.
            out = CLEAR + "\r\n".join(f"{line}\033[K" for line in lines)
        else:
            out = "".join(f"\033[{row};1H{line}\033[K" for row, line in enumerate(lines, 1)
                          if row > len(self.drawn) or self.drawn[row - 1] != line)  # fmt: skip
            if len(lines) < len(self.drawn):
                out += f"\033[{len(lines) + 1};1H\033[J"
            out += f"\033[{len(lines) + 1};1H"
        self.drawn = lines
        return out

    def show(self, state: RunState, io_port: int = IO_TRSVCID) -> None:
        # Standard output often ends in a journal or a log file that others can read: the
        # secrets go only to the consoles (the screen in front of the machine) and to root's
        # `storagetm status --show-secrets`.
        shown = state if self.consoles else state.without_secrets()
        if self.overlay is not None and self.consoles:
            text = "".join(f"{line}\n" for line in self.overlay)
        else:
            rows = 25 - len(self.panel)
            text = render(shown, io_port, dashboard=self.terminal, rows=rows, keys=bool(self.panel))
            text += "".join(f"{line}\n" for line in self.panel)
        if text == self.last:
            return
        self.last = text
        if not self.consoles:
            print(text, flush=True)
            return
        lines = text.splitlines()
        payload = self._changes(coloured(lines, warning_rows(shown)) if self.terminal else lines).encode()
        for console in self.consoles:
            fd = self._fd(console)
            if fd is None:
                continue
            try:
                write_all(fd, payload)
            except OSError as exc:
                log.debug("cannot write to %s: %s", console, exc)
                os.close(self.fds.pop(console))

    def farewell(self, line: str) -> None:
        """The last line under the dashboard when storagetm stops: what it did to the disks."""
        if not self.consoles:
            print(line, flush=True)
            return
        below = f"\033[{len(self.drawn) + 1};1H\033[J" if self.drawn is not None else "\r\n"
        payload = f"{below}{printable(line)}\r\n".encode()
        for console in self.consoles:
            fd = self._fd(console)
            if fd is not None:
                with contextlib.suppress(OSError):
                    write_all(fd, payload)

    def fatal(self, line: str) -> None:
        """Why storagetm stopped, on every console (stderr reaches only the last console=)."""
        payload = f"\r\nstoragetm: {printable(line)}\r\n".encode()
        for console in self.consoles:
            fd = self._fd(console)
            if fd is not None:
                with contextlib.suppress(OSError):
                    write_all(fd, payload)

    def _fd(self, console: str) -> int | None:
        """Consoles stay open: closing a serial port shuts the UART down and drops what it
        had not sent yet."""
        if console not in self.fds:
            try:
                self.fds[console] = os.open(console, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("cannot open %s: %s", console, exc)
                return None
        return self.fds[console]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def write_all(fd: int, payload: bytes, timeout: float = 2.0) -> None:
    """Write everything to a non-blocking tty, waiting for room (a serial console drains
    slowly), but never hang the daemon on a stuck console for longer than `timeout`."""
    deadline = time.monotonic() + timeout
    view = memoryview(payload)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("console does not drain") from None
            select.select([], [fd], [], remaining)
