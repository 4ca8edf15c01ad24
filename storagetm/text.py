"""Text for people: strings from hardware or the network made harmless for a terminal (a
disk whose model holds `ESC[2J` must not clear the operator's screen, nor a newline forge a
log line), and sizes in binary units. The standard library only: the initiator-side helper
uses it too."""

from __future__ import annotations

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
