"""The large console font: switched only where the screen still holds 80x25 with it."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import termios
from collections.abc import Iterator

import pytest

from storagetm.console import font


@pytest.fixture
def terminal() -> Iterator[tuple[str, int]]:
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave), slave
    finally:
        os.close(master)
        os.close(slave)


def size(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_the_large_font_only_where_80x25_still_fits() -> None:
    assert font.fits_large(160, 50)  # 1280x800 with 8x16 cells
    assert font.fits_large(240, 67)  # 1920x1080
    assert not font.fits_large(128, 48)  # 1024x768: 64x24 with the large font
    assert not font.fits_large(100, 37)  # 800x600


def test_the_font_request_names_terminus_16x32_by_address() -> None:
    name = ctypes.create_string_buffer(font.LARGE)
    op = font.font_op(ctypes.addressof(name))
    assert len(op) == 32  # struct console_font_op on 64-bit: five unsigned ints, padding, a pointer
    assert struct.unpack("@IIIIIP", op) == (font.KD_FONT_OP_SET_DEFAULT, 0, 0, 0, 0, ctypes.addressof(name))
    assert ctypes.string_at(ctypes.addressof(name)) == b"TER16x32"


def test_a_large_screen_gets_the_font_and_a_small_one_keeps_its_own(terminal: tuple[str, int]) -> None:
    path, fd = terminal
    asked: list[int] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        asked.append(request)
        return arg

    size(fd, 100, 37)
    assert font.enlarge(path, ioctl) is False and asked == []
    size(fd, 160, 50)
    assert font.enlarge(path, ioctl) is True and asked == [font.KDFONTOP]

    def refused(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EINVAL, "Invalid argument")  # vgacon, or no VT at all

    assert font.enlarge(path, refused) is False


def test_only_virtual_terminals_are_given_a_font() -> None:
    assert font.virtual_terminals(["/dev/tty0", "/dev/ttyS0", "/dev/tty1", "/dev/hvc0"]) == ["/dev/tty0", "/dev/tty1"]
