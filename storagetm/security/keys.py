"""NVMe's key interchange formats, `DHHC-1:00:…:` (DH-HMAC-CHAP secrets) and
`NVMeTLSkey-1:01:…:` (TLS PSKs): a prefix, then base64 of the key followed by its
CRC-32 (little-endian), then a colon, as nvme-cli's gen-dhchap-key and gen-tls-key make them."""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from storagetm.errors import UsageError

HIDDEN = "(hidden)"  # what `storagetm status` shows instead of a secret, unless asked


SECRET_MARKS = ("DHHC-1:", "NVMeTLSkey-1:")
ON_COMMAND_LINE = (
    "a secret given on the command line is visible to every user of this machine (ps, /proc/PID/cmdline); "
    "give it as @FILE (--dhchap-secret=@/root/secret), or as the systemd credential storagetm.dhchap-secret, "
    "storagetm.dhchap-ctrl-secret or storagetm.tls-key"
)


def hidden(secret: str) -> str:
    return HIDDEN if secret else ""


def from_argument(value: str, what: str) -> str:
    """An option's value, or with `@FILE` what FILE holds: a secret passed so never is on
    the command line."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} from {value[1:]}: {exc.strerror or exc}",
                         hint="give the path of a file that holds it, readable by root only") from None  # fmt: skip


def on_command_line(argv: Sequence[str]) -> bool:
    """True if a secret itself (not @FILE) is among the arguments."""
    return any(mark in arg for arg in argv for mark in SECRET_MARKS)


def generate(prefix: str, length: int = 32) -> str:
    key = os.urandom(length)  # what secrets.token_bytes() does, without importing it
    return prefix + base64.b64encode(key + struct.pack("<I", zlib.crc32(key))).decode() + ":"


def check(text: str, pattern: re.Pattern[str], lengths: tuple[int, ...], what: str, example: str) -> str:
    """`text` stripped, if it has the format and a key of a valid length with the right CRC."""
    text = text.strip()
    if not pattern.match(text):
        raise UsageError(f"invalid {what}", hint=f"use {example}")
    try:
        raw = _decoded(text)
    except binascii.Error:
        raise UsageError(f"invalid {what}: not valid base64", hint="copy it again, or make a new one") from None
    key, crc = raw[:-4], raw[-4:]
    if len(key) not in lengths or struct.pack("<I", zlib.crc32(key)) != crc:
        raise UsageError(f"invalid {what}: bad length or checksum", hint="copy it again, or make a new one")
    return text


def key_bytes(text: str) -> bytes:
    """The key itself, of a text that `check` accepted (its base64 without the CRC)."""
    return _decoded(text)[:-4]


def _decoded(text: str) -> bytes:
    return base64.b64decode(text.split(":")[2], validate=True)
