"""Keys from the consoles the screen is drawn on (tty1 and the serial console): the bytes
read one key at a time (no line editing, no echo, no signals), decoded into key names.
Nothing here runs a shell or a login: a key is only ever a name the panel looks up."""

from __future__ import annotations

import contextlib
import os
import termios
from collections.abc import Sequence
from typing import Any

from storagetm.system.log import Logger

log = Logger(__name__)

ESC = 0x1B
# What terminals send for the keys the panel names (VT100/xterm and the Linux console).
SEQUENCES = {b"[A": "up", b"[B": "down", b"[C": "right", b"[D": "left", b"OA": "up", b"OB": "down",
             b"OC": "right", b"OD": "left"}  # fmt: skip
CONTROLS = {0x0D: "enter", 0x0A: "enter", 0x7F: "backspace", 0x08: "backspace", 0x03: "ctrl-c", 0x09: "tab"}


def decode(data: bytes) -> list[str]:
    """Key names for what one read returned: a printable character is itself (lower case),
    Enter "enter", a lone Esc "escape", an arrow "up" …; other escape sequences and control
    bytes are dropped. A terminal sends each key's sequence in one write, so one read never
    ends inside a sequence that matters here."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == ESC:
            end = _sequence_end(data, i + 1)
            if end == i + 1:
                keys.append("escape")
            elif (name := SEQUENCES.get(data[i + 1 : end])) is not None:
                keys.append(name)
            i = end
            continue
        if byte in CONTROLS:
            keys.append(CONTROLS[byte])
        elif 0x20 <= byte < 0x7F:
            keys.append(chr(byte).lower())
        i += 1
    return keys


def _sequence_end(data: bytes, start: int) -> int:
    """Where the escape sequence starting after ESC at `start` ends (start itself: a lone Esc)."""
    if start >= len(data):
        return start
    if data[start] == ord("["):  # CSI: parameters, then one final byte 0x40-0x7E
        i = start + 1
        while i < len(data) and not 0x40 <= data[i] <= 0x7E:
            i += 1
        return min(i + 1, len(data))
    if data[start] == ord("O"):  # SS3: one more byte
        return min(start + 2, len(data))
    if data[start] == ESC:
        return start
    return start + 1  # Alt+key: the key, dropped


class KeyInput:
    """The consoles opened for reading, each in cbreak mode for as long as storagetm runs,
    restored on close. A console that is not a terminal, or cannot be opened, is skipped."""

    def __init__(self, consoles: Sequence[str]) -> None:
        self.saved: dict[int, list[Any]] = {}
        self.names: dict[int, str] = {}
        for console in dict.fromkeys(consoles):
            try:
                fd = os.open(console, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("cannot read keys from %s: %s", console, exc.strerror)
                continue
            try:
                self.saved[fd] = termios.tcgetattr(fd)
                termios.tcsetattr(fd, termios.TCSANOW, cbreak(self.saved[fd]))
            except termios.error:
                self.saved.pop(fd, None)
                os.close(fd)
                continue
            self.names[fd] = console

    def fds(self) -> list[int]:
        return list(self.names)

    def read(self, fd: int) -> list[str]:
        """The keys waiting on `fd`; a console that went away is closed and read no more."""
        try:
            data = os.read(fd, 256)
        except BlockingIOError:
            return []
        except OSError as exc:
            log.debug("cannot read keys from %s: %s", self.names.get(fd), exc.strerror)
            self._close(fd)
            return []
        if not data:  # a hang-up
            self._close(fd)
            return []
        return decode(data)

    def _close(self, fd: int) -> None:
        attrs = self.saved.pop(fd, None)
        if attrs is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
        self.names.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        for fd in list(self.names):
            self._close(fd)


def cbreak(attrs: list[Any]) -> list[Any]:
    """Terminal attributes for one key at a time: no line editing, no echo (nothing typed
    shows or piles up on the screen), no signals (Ctrl+C is a key), no flow control
    (Ctrl+S must not freeze the screen); output processing unchanged."""
    new = list(attrs)
    new[0] &= ~(termios.IXON | termios.IXOFF)
    new[3] &= ~(termios.ICANON | termios.ECHO | termios.ECHONL | termios.ISIG | termios.IEXTEN)
    cc = list(new[6])
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    new[6] = cc
    return new
