"""The operator's screen: what to type on the other machine, and what is exported."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from storagetm.exports import DISCOVERY_TRSVCID, IO_TRSVCID, Export
from storagetm.modes import Mode
from storagetm.state import RunState

log = logging.getLogger(__name__)

CLEAR = "\033[H\033[2J"
WIDTH = 80
ANYONE = "Anyone who can reach this machine over the network"
WITH_SECRET = "Only an initiator with the host NQN and secret below"
WARNINGS = {
    Mode.READ_WRITE: "{who} can READ AND WRITE {what}.",
    Mode.READ_ONLY: "{who} can READ {what}; writes are refused.",
    Mode.SNAPSHOT: "{who} can READ {what} and write to a RAM copy; the disks themselves are not changed.",
}
NOT_ENCRYPTED = "The traffic is not encrypted: others on the network can read the data in transit."


def warnings(state: RunState) -> list[str]:
    """One plain sentence per mode in use: who can read and write which disks."""
    by_mode: dict[Mode, list[str]] = {}
    for export in state.exports.values():
        by_mode.setdefault(export.mode, []).append(export.disk.name)
    who = WITH_SECRET if state.auth.enabled else ANYONE
    extra = [NOT_ENCRYPTED] if state.auth.enabled else []
    if len(by_mode) <= 1:
        mode = next(iter(by_mode), Mode.READ_WRITE)
        return [WARNINGS[mode].format(who=who, what="these disks"), *extra]
    return [WARNINGS[mode].format(who=who, what=", ".join(sorted(names))) for mode, names in sorted(
        by_mode.items(), key=lambda item: item[0].value)] + extra  # fmt: skip


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def mode_text(state: RunState, export: Export) -> str:
    if export.mode is not Mode.SNAPSHOT:
        return export.mode.label
    usage = state.snapshot_usage.get(export.nqn)
    if usage is None:
        return f"snapshot, {human_size(export.snapshot_size)} RAM"
    if usage.invalid:
        return "snapshot FULL: I/O now fails"
    return f"snapshot {usage.percent:.0f}% of {human_size(usage.total)} used"


def _connect_args(state: RunState, io_port: int) -> str:
    args = "" if io_port in (IO_TRSVCID, DISCOVERY_TRSVCID) else f" -s {io_port}"
    if state.auth.enabled:
        args += f" --hostnqn={state.auth.hosts[0]} --dhchap-secret={state.auth.secret}"
        if state.auth.ctrl_secret:
            args += f" --dhchap-ctrl-secret={state.auth.ctrl_secret}"
    return args


def render(state: RunState, io_port: int = IO_TRSVCID) -> str:
    lines = ["storagetm: target disk mode — disks exported over NVMe/TCP", *warnings(state), ""]
    if not state.addresses:
        lines.append("No network address yet: plug in a cable (DHCP, or link-local on a direct cable).")
    else:
        lines.append("On the other machine, as root, type one of:")
        for address in state.addresses:
            lines.append(f"  nvme connect-all -t tcp -a {address.for_command}{_connect_args(state, io_port)}")
        if any(a.link_local and a.family == "ipv6" for a in state.addresses):
            lines.append("  (for fe80:: use the other machine's interface after % and -f if its name differs)")
        if len(state.auth.hosts) > 1:
            lines.append(f"  (allowed host NQNs: {', '.join(state.auth.hosts)})")
    lines.append("")
    if state.exports:
        lines.append(f"Exported disks ({len(state.exports)}):")
        for export in sorted(state.exports.values(), key=lambda e: e.disk.name):
            disk = export.disk
            lines.append(f"  {disk.name:<10} {human_size(disk.size):>10}  {export.identity.model[:30]}"
                         f"  {export.identity.serial}  [{mode_text(state, export)}]")  # fmt: skip
            lines.append(f"    {export.nqn}")
    else:
        lines.append("No disks exported yet.")
    if state.not_exported:
        skipped = ", ".join(f"{item['name']} ({item['reason']})" for item in state.not_exported)
        lines.append(f"Not exported: {skipped}")
    for problem in state.problems:
        lines.append(f"! {problem}")
    lines.append("")
    lines.append("Stop with Ctrl+C here or `storagetm stop`; the machine then reboots.")
    return "\n".join(lines) + "\n"


def active_consoles(active: Path = Path("/sys/class/tty/console/active")) -> list[str]:
    """The kernel's consoles (console= on the kernel command line), as device paths."""
    try:
        names = active.read_text().split()
    except OSError:
        return []
    return [f"/dev/{name}" for name in names]


class Screen:
    """Writes the rendered screen to stdout or to a set of console devices."""

    def __init__(self, consoles: Sequence[str] = ()) -> None:
        self.consoles = list(consoles)
        self.last = ""

    def show(self, text: str, *, force: bool = False) -> None:
        if text == self.last and not force:
            return
        self.last = text
        if not self.consoles:
            print(text, flush=True)
            return
        payload = (CLEAR + text.replace("\n", "\r\n")).encode()
        for console in self.consoles:
            try:
                fd = os.open(console, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("cannot open %s: %s", console, exc)
                continue
            try:
                os.write(fd, payload)
            except OSError as exc:
                log.debug("cannot write to %s: %s", console, exc)
            finally:
                os.close(fd)
