"""What a key on the target's own keyboard does: a small state machine, no I/O. It turns key
names (console/keys.py) into commands the daemon carries out, and says what the bottom of
the screen shows meanwhile. A choice that opens the disks to more (read-write,
authentication off) or ends the session (power off, reboot) asks for a confirmation."""

from __future__ import annotations

import enum

from msgspec import Struct

from storagetm.backing.modes import Mode
from storagetm.system.power import End

KEYS_LINE = "Keys: m mode  1-9 one disk  a auth  q QR code  p power off  r reboot  h help"
MODE_KEYS = {"o": Mode.READ_ONLY, "s": Mode.SNAPSHOT, "w": Mode.READ_WRITE}
MODE_PROMPT = "Mode for {what}: o read-only  s snapshot (RAM copy)  w read-write  Esc back"
CONFIRM = " Press y to confirm, any other key to cancel."
HELP = [
    "storagetm keys (the other machine connects with the lines above):",
    "  m      the mode of every disk: read-only, snapshot (writes in RAM), read-write",
    "  1-9    the mode of one disk, by its number in the list",
    "  a      authentication on (a new secret, shown with the line to type) or off",
    "  q      a QR code of the connection details, for a phone to carry them over",
    "  p      power off: exports withdrawn, disks flushed, then the power goes",
    "  r      reboot, the same way",
    "  h, ?   this help",
    "The power button and Ctrl+Alt+Del end the same clean way.",
    "Any key: back.",
]


class SetMode(Struct, frozen=True):
    mode: Mode
    nqn: str | None = None  # None: every disk


class SetAuth(Struct, frozen=True):
    on: bool


class Finish(Struct, frozen=True):
    end: End


Command = SetMode | SetAuth | Finish


class DiskChoice(Struct, frozen=True):
    """One exported disk as the panel numbers it: the screen's order."""

    nqn: str
    name: str
    mode: Mode


class Stage(enum.Enum):
    KEYS = "keys"  # the keys line; a key starts something
    MODE = "mode"  # which mode, for all disks or one
    CONFIRM = "confirm"
    HELP = "help"
    QR = "qr"


class Panel:
    def __init__(self) -> None:
        self.stage = Stage.KEYS
        self.target: DiskChoice | None = None  # the disk a MODE stage is for; None: all
        self.covered: list[DiskChoice] = []  # the disks a MODE stage changes
        self.pending: Command | None = None
        self.question = ""
        self.note = ""  # the last thing done or refused, shown under the keys line

    def handle(self, key: str, disks: list[DiskChoice], auth_on: bool) -> list[Command]:
        """The commands `key` gives now (most keys give none: they move the panel on)."""
        stage, self.stage = self.stage, Stage.KEYS
        if stage in (Stage.HELP, Stage.QR):
            return []  # any key closes them
        if stage is Stage.MODE:
            return self._mode(key)
        if stage is Stage.CONFIRM:
            command, self.pending = self.pending, None
            if key == "y" and command is not None:
                return [command]
            self.note = "Cancelled."
            return []
        return self._start(key, disks, auth_on)

    def _start(self, key: str, disks: list[DiskChoice], auth_on: bool) -> list[Command]:
        self.note = ""
        if key == "m":
            self.stage, self.target, self.covered = Stage.MODE, None, list(disks)
        elif key.isdigit() and key != "0":
            index = int(key) - 1
            if index >= len(disks):
                self.note = f"There is no disk {key}: the disks are numbered 1-{len(disks)}." if disks else \
                    "No disk is exported."  # fmt: skip
            else:
                self.stage, self.target, self.covered = Stage.MODE, disks[index], [disks[index]]
        elif key == "a":
            if not auth_on:
                return [SetAuth(True)]
            self._ask(SetAuth(False), "Turn authentication OFF? Then anyone on the network can connect.")
        elif key == "q":
            self.stage = Stage.QR
        elif key == "p":
            self._ask(Finish(End.POWEROFF), "Power off? The exports are withdrawn and the disks flushed first.")
        elif key == "r":
            self._ask(Finish(End.REBOOT), "Reboot? The exports are withdrawn and the disks flushed first.")
        elif key in ("h", "?"):
            self.stage = Stage.HELP
        return []

    def _mode(self, key: str) -> list[Command]:
        mode = MODE_KEYS.get(key)
        if mode is None:
            return []  # Esc or any other key: back
        target = self.target
        command = SetMode(mode, target.nqn if target else None)
        what = target.name if target else "every disk"
        # Leaving snapshot mode drops the RAM copy: what the other machine wrote there is gone.
        dropped = [d.name for d in self.covered if d.mode is Mode.SNAPSHOT and mode is not Mode.SNAPSHOT]
        if dropped:
            also = f" and make {what} READ-WRITE" if mode is Mode.READ_WRITE else ""
            self._ask(command, f"Discard what was written to the snapshot of {', '.join(dropped)}{also}?")
            return []
        if mode is Mode.READ_WRITE:
            self._ask(command, f"Make {what} READ-WRITE? The other machine can then change it.")
            return []
        return [command]

    def _ask(self, command: Command, question: str) -> None:
        self.stage, self.pending, self.question = Stage.CONFIRM, command, question

    def lines(self) -> list[str]:
        """The bottom of the screen (the help replaces the screen: `overlay`)."""
        if self.stage is Stage.MODE:
            what = self.target.name if self.target else "every disk"
            return [MODE_PROMPT.format(what=what)]
        if self.stage is Stage.CONFIRM:
            return [self.question + CONFIRM]
        return [KEYS_LINE] + ([self.note] if self.note else [])

    @property
    def overlay(self) -> list[str] | None:
        """Lines that replace the whole screen for now (help); None: the dashboard."""
        return HELP if self.stage is Stage.HELP else None
