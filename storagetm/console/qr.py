"""A QR code for the screen, drawn by `qrencode` (Debian's qrencode package) with half-block
characters: two modules per text row, so a code of the connection details fits 80x25.
The text (it may hold secrets) goes to qrencode on its standard input, never in argv."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

from storagetm import connection
from storagetm.console.screen import connect_lines

if TYPE_CHECKING:
    from storagetm.state import RunState

QRENCODE = ["qrencode", "-t", "UTF8", "-l", "L", "-m", "2", "-o", "-"]
TIMEOUT = 5.0  # seconds


def render(text: str, run: Callable[[list[str], bytes], str] | None = None) -> list[str]:
    """The QR code of `text` as screen rows, or one line saying why there is none."""
    try:
        out = (run or _run)(QRENCODE, text.encode())
    except FileNotFoundError:
        return ["No QR code: qrencode is not installed (Debian package qrencode)."]
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"No QR code: qrencode failed ({exc})."]
    return out.splitlines()


def _run(argv: list[str], data: bytes) -> str:
    done = subprocess.run(argv, input=data, capture_output=True, timeout=TIMEOUT, check=True)
    return done.stdout.decode()


def connection_text(run: RunState, io_port: int) -> str:
    """What the QR code holds: the connection code `storagetm connect` takes (addresses, port,
    host NQN, secrets); without an address yet, the first command to type on the other machine."""
    if code := connection.code_text(run):
        return code
    commands = [line.strip() for line in connect_lines(run, io_port) if line.strip().startswith("nvme connect")]
    return commands[0] if commands else ""
