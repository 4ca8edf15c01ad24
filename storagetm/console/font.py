"""A large console font where the screen has room for it: the kernel's built-in Terminus
16x32 (Debian builds CONFIG_FONT_TER16x32=y) doubles the 8x16 font's size. Switched only
when the screen still holds 80x25 with it (1280x800 and up), since the dashboard is laid out
for 80 columns; on a smaller screen, on a serial line, or without a framebuffer console,
nothing changes."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import termios
from collections.abc import Callable

from storagetm.system.log import Logger

log = Logger(__name__)

KDFONTOP = 0x4B72  # linux/kd.h
KD_FONT_OP_SET_DEFAULT = 2
LARGE = b"TER16x32"
LARGE_SCALE = (2, 2)  # the large font's cells, in cells of the 8x16 one
COLUMNS, ROWS = 80, 25


def fits_large(columns: int, rows: int, scale: tuple[int, int] = LARGE_SCALE) -> bool:
    """Whether the screen, now `columns` x `rows` with the 8x16 font, still holds 80x25 with the large one."""
    return columns // scale[0] >= COLUMNS and rows // scale[1] >= ROWS


def font_op(name_address: int) -> bytes:
    """struct console_font_op for "set the built-in font named at `name_address`"."""
    return struct.pack("@IIIIIP", KD_FONT_OP_SET_DEFAULT, 0, 0, 0, 0, name_address)


def enlarge(console: str, ioctl: Callable[[int, int, bytes], bytes] | None = None) -> bool:
    """Terminus 16x32 on the virtual terminal `console` if the screen has room; True if switched."""
    try:
        fd = os.open(console, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
        if not fits_large(columns, rows):
            return False
        name = ctypes.create_string_buffer(LARGE)
        (ioctl or fcntl.ioctl)(fd, KDFONTOP, font_op(ctypes.addressof(name)))
    except OSError as exc:  # not a VT, or no framebuffer console (vgacon, dummy): the font stays
        log.debug("keeping the console font of %s: %s", console, exc.strerror)
        return False
    finally:
        os.close(fd)
    log.info("console font of %s: %s (was %dx%d characters)", console, LARGE.decode(), columns, rows)
    return True


def virtual_terminals(consoles: list[str]) -> list[str]:
    """The consoles that are virtual terminals (tty0, tty1, …), not serial lines."""
    return [c for c in consoles if os.path.basename(c).removeprefix("tty").isdigit()]
