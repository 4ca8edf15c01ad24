"""Text for people: strings from hardware or the network made harmless for a terminal (a
disk whose model holds `ESC[2J` must not clear the operator's screen, nor a newline forge a
log line), and sizes in binary units. The standard library only: the initiator-side helper
uses it too."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

REPLACEMENT = "?"
# C0 controls, DEL and C1 controls (U+0080-U+009F: some terminals take U+009B as CSI).
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], REPLACEMENT)


def human_size(size: float) -> str:
    """Bytes in binary units: "512 B", "1.5 KiB", "3.7 TiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def printable(text: str) -> str:
    """`text` with every control character replaced; plain spaces stay."""
    return text.translate(_CONTROLS)


class PrintableLogFilter:
    """Log records leave with their message made printable, whatever the arguments held.
    Any object with this `filter` method is a logging filter: no logging.Filter base, so
    the helper, which logs nothing, starts without importing logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True
