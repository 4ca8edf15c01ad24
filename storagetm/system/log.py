"""The daemon's log: one line per message on standard error, made printable whatever the
arguments held. When journald reads the stream the line starts with its syslog priority
(`<4>` a warning), so `journalctl -p warning -u storagetm` finds the warnings; in a terminal
it starts with `storagetm: `.

Not the standard library's `logging`: a level and a line per message is all storagetm asks
of it, and importing it (with traceback, string, threading and weakref) was 0.1-0.2 s of the
daemon's CPU at every boot under emulation (docs/measurements.md, "Where the daemon's CPU
goes"). Tests read what was logged with `capture()`."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NamedTuple, TextIO

from storagetm.text import printable

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
SYSLOG_PRIORITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}


class Record(NamedTuple):
    logger: str
    level: int
    message: str

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]


class Destination:
    """Where lines go and from which level: `configure()` sets it for the process. Until then
    warnings and errors still reach standard error, as the standard library's last resort does."""

    def __init__(self, level: int = WARNING, stream: TextIO | None = None, journal: bool = False) -> None:
        self.level, self.stream, self.journal = level, stream, journal
        self.captured: list[Record] | None = None  # capture(): records kept, nothing written

    def emit(self, record: Record) -> None:
        if self.captured is not None:
            self.captured.append(record)
            return
        if record.level < self.level:
            return
        prefix = f"<{SYSLOG_PRIORITY[record.level]}>" if self.journal else "storagetm: "
        stream = self.stream or sys.stderr
        with contextlib.suppress(OSError, ValueError):  # a closed or full stderr costs the line, never the caller
            stream.write("".join(f"{prefix}{line}\n" for line in record.message.splitlines() or [""]))
            stream.flush()


_destination = Destination()


def configure(debug: bool = False, stream: TextIO | None = None) -> None:
    """From now on: debug lines too if asked, to `stream` (standard error)."""
    _destination.level = DEBUG if debug else INFO
    _destination.stream = stream
    _destination.journal = bool(os.environ.get("JOURNAL_STREAM"))


@contextlib.contextmanager
def capture() -> Iterator[list[Record]]:
    """Every record of every level, kept in the list instead of written, until the block ends."""
    records: list[Record] = []
    before, _destination.captured = _destination.captured, records
    try:
        yield records
    finally:
        _destination.captured = before


class Logger:
    """`log = Logger(__name__)`; `log.warning("cannot flush %s: %s", disk, why)`. With
    `exc_info=True` the exception being handled follows the message (its traceback)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        destination = _destination
        if destination.captured is None and level < destination.level:
            return  # the formatting too is skipped: most debug lines cost nothing
        # One line, whatever the arguments held: a newline in one cannot forge a second line.
        text = printable(message % args if args else message)
        if exc_info and sys.exc_info()[0] is not None:
            import traceback  # only when there is one to show

            text += "".join(f"\n{printable(line)}" for line in traceback.format_exc().rstrip("\n").split("\n"))
        destination.emit(Record(self.name, level, text))

    def debug(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.log(DEBUG, message, *args, exc_info=exc_info)

    def info(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.log(INFO, message, *args, exc_info=exc_info)

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.log(WARNING, message, *args, exc_info=exc_info)

    def error(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.log(ERROR, message, *args, exc_info=exc_info)

    def exception(self, message: str, *args: object) -> None:
        self.log(ERROR, message, *args, exc_info=True)

