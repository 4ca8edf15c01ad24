"""The connection code: everything the other machine needs to connect, as one string short
enough to read off the screen or scan as a QR code.

Binary first (version, flags, addresses, port, host NQN, secrets), then a CRC-32 over all of
it, then upper-case base32 in dash-separated groups behind `STM1-`: QR's alphanumeric mode
carries exactly these characters (0-9 A-Z and `-`) at 5.5 bits each. A CRC-32 detects every
error burst up to 32 bits, so any one mistyped character (5 bits) or two swapped neighbours
(10 bits) is caught. Pure: no I/O, only the stdlib, so the initiator-side helper can use it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
import uuid
import zlib
from typing import TYPE_CHECKING, NamedTuple

from storagetm.protocol import DISCOVERY_TRSVCID, UUID_NQN_PREFIX

if TYPE_CHECKING:
    from storagetm.state import RunState

PREFIX = "STM1"
VERSION = 1
GROUP = 5
NQN_MAX = 223

# flags
F_SECRET, F_CTRL_SECRET, F_TLS_KEY, F_UUID_NQN = 0x01, 0x02, 0x04, 0x08
KNOWN_FLAGS = F_SECRET | F_CTRL_SECRET | F_TLS_KEY | F_UUID_NQN

# The two key interchange formats (storagetm/security/keys.py): the hash id field is the
# two digits after the prefix; the key itself follows as base64 of key + CRC-32 (LE).
SECRET_PREFIX, TLS_PREFIX = "DHHC-1", "NVMeTLSkey-1"
_KEY_RE = re.compile(r"^(DHHC-1|NVMeTLSkey-1):(0[0-3]):([A-Za-z0-9+/]+={0,2}):$")
_SECRET_LENGTHS, _TLS_LENGTHS = (32, 48, 64), (32, 48)
# Characters people misread on a screen, mapped to what base32 has instead.
_LOOKALIKES = str.maketrans({"0": "O", "1": "I", "8": "B"})


# A NamedTuple, not a dataclass: the daemon imports this module at start, where importing
# dataclasses alone costs more CPU than the rest of it, and the helper runs without msgspec.
class ConnectionCode(NamedTuple):
    addresses: tuple[str, ...]  # IPs without zone: the helper finds the interface for link-local ones
    port: int
    host_nqn: str = ""
    secret: str = ""  # DH-HMAC-CHAP host secret, DHHC-1:…:
    ctrl_secret: str = ""  # DH-HMAC-CHAP controller secret (the target proves itself)
    tls_key: str = ""  # the configured TLS PSK, NVMeTLSkey-1:…:

    @property
    def has_secrets(self) -> bool:
        return bool(self.secret or self.ctrl_secret or self.tls_key)


def _fail(why: str) -> ValueError:
    return ValueError(f"connection code: {why}")


def _key_fields(text: str, prefix: str, lengths: tuple[int, ...], what: str) -> tuple[int, bytes]:
    """(hash id, raw key) of a key in its interchange format, its CRC checked."""
    match = _KEY_RE.fullmatch(text)
    if not match or match.group(1) != prefix:
        raise _fail(f"the {what} is not of the form {prefix}:0N:<base64>:")
    try:
        raw = base64.b64decode(match.group(3), validate=True)
    except binascii.Error:
        raise _fail(f"the {what} is not valid base64") from None
    key, crc = raw[:-4], raw[-4:]
    if len(key) not in lengths or struct.pack("<I", zlib.crc32(key)) != crc:
        raise _fail(f"the {what} has a bad length or checksum")
    return int(match.group(2)), key


def _key_text(prefix: str, hash_id: int, key: bytes) -> str:
    return f"{prefix}:{hash_id:02d}:" + base64.b64encode(key + struct.pack("<I", zlib.crc32(key))).decode() + ":"


def _pack_address(address: str) -> bytes:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _fail(f"{address!r} is not an IP address (without a %zone)") from None
    return bytes([ip.version]) + ip.packed


def encode(code: ConnectionCode) -> str:
    """The code as text: STM1-XXXXX-XXXXX-…"""
    if not 0 < len(code.addresses) < 256:
        raise _fail("it needs between 1 and 255 addresses")
    if not 0 < code.port < 65536:
        raise _fail(f"port {code.port} is out of range")
    flags = 0
    body = bytearray([len(code.addresses)])
    for address in code.addresses:
        body += _pack_address(address)
    body += struct.pack(">H", code.port)
    nqn = code.host_nqn
    uuid_form = nqn.startswith(UUID_NQN_PREFIX) and _canonical_uuid(nqn.removeprefix(UUID_NQN_PREFIX))
    if uuid_form:
        flags |= F_UUID_NQN
        body += uuid.UUID(nqn.removeprefix(UUID_NQN_PREFIX)).bytes
    else:
        raw = nqn.encode()
        if len(raw) > NQN_MAX:
            raise _fail(f"the host NQN is {len(raw)} bytes, at most {NQN_MAX}")
        body += bytes([len(raw)]) + raw
    for flag, text, prefix, lengths, what in (
        (F_SECRET, code.secret, SECRET_PREFIX, _SECRET_LENGTHS, "DH-HMAC-CHAP secret"),
        (F_CTRL_SECRET, code.ctrl_secret, SECRET_PREFIX, _SECRET_LENGTHS, "controller secret"),
        (F_TLS_KEY, code.tls_key, TLS_PREFIX, _TLS_LENGTHS, "TLS key"),
    ):
        if text:
            flags |= flag
            hash_id, key = _key_fields(text, prefix, lengths, what)
            body += bytes([hash_id, len(key)]) + key
    payload = bytes([VERSION, flags]) + bytes(body)
    payload += struct.pack(">I", zlib.crc32(payload))
    letters = base64.b32encode(payload).decode().rstrip("=")
    return "-".join([PREFIX, *(letters[i : i + GROUP] for i in range(0, len(letters), GROUP))])


def _canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def looks_like_code(text: str) -> bool:
    return re.sub(r"[\s-]", "", text).upper().startswith(PREFIX)


def decode(text: str) -> ConnectionCode:
    """The code of a text as `encode` makes it; lower case, spaces and line breaks are fine.
    ValueError, with one line saying what is wrong, for anything else."""
    letters = re.sub(r"[\s-]", "", text).upper()
    if not letters.startswith(PREFIX):
        raise _fail(f"it does not start with {PREFIX}- (copy the whole code from the target's screen)")
    letters = letters.removeprefix(PREFIX).translate(_LOOKALIKES)
    if not letters or re.fullmatch(r"[A-Z2-7]+", letters) is None:
        raise _fail("it holds characters a code never has (only A-Z, 2-7 and -)")
    try:
        payload = base64.b32decode(letters + "=" * (-len(letters) % 8))
    except binascii.Error:
        raise _fail("it is too short or too long — a character is missing or one too many") from None
    if len(payload) < 6:
        raise _fail("it is too short — copy the whole code")
    if struct.pack(">I", zlib.crc32(payload[:-4])) != payload[-4:]:
        raise _fail("checksum wrong — a character was mistyped")
    try:
        return _parse(payload[:-4])
    except (IndexError, struct.error, UnicodeDecodeError):
        raise _fail("its contents are damaged") from None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, count: int) -> bytes:
        if self.at + count > len(self.data):
            raise IndexError("short")
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]


def _parse(payload: bytes) -> ConnectionCode:
    read = _Reader(payload)
    version = read.byte()
    if version != VERSION:
        raise _fail(f"version {version} is not known to this helper (it knows {VERSION}): update it")
    flags = read.byte()
    if flags & ~KNOWN_FLAGS:
        raise _fail("it uses features this helper does not know: update it")
    addresses: list[str] = []
    for _ in range(read.byte()):
        family = read.byte()
        if family not in (4, 6):
            raise _fail("its contents are damaged")
        addresses.append(str(ipaddress.ip_address(read.take(4 if family == 4 else 16))))
    (port,) = struct.unpack(">H", read.take(2))
    if flags & F_UUID_NQN:
        host_nqn = UUID_NQN_PREFIX + str(uuid.UUID(bytes=read.take(16)))
    else:
        host_nqn = read.take(read.byte()).decode()
    keys: dict[int, str] = {}
    for flag, prefix in ((F_SECRET, SECRET_PREFIX), (F_CTRL_SECRET, SECRET_PREFIX), (F_TLS_KEY, TLS_PREFIX)):
        if flags & flag:
            hash_id = read.byte()
            keys[flag] = _key_text(prefix, hash_id, read.take(read.byte()))
    if read.at != len(payload):
        raise _fail("its contents are damaged")
    return ConnectionCode(tuple(addresses), port, host_nqn, keys.get(F_SECRET, ""), keys.get(F_CTRL_SECRET, ""),
                          keys.get(F_TLS_KEY, ""))  # fmt: skip


def for_state(state: RunState) -> ConnectionCode:
    """The code of a running target: its addresses, its I/O port, the host NQN it expects
    and the secrets. ValueError if it has no address yet, or its secrets are hidden."""
    addresses = tuple(dict.fromkeys(address.address.split("%")[0] for address in state.addresses))
    io_ports = [listener.trsvcid for listener in state.ports if listener.trsvcid != DISCOVERY_TRSVCID]
    port = io_ports[0] if io_ports else DISCOVERY_TRSVCID
    host_nqn = state.auth.hosts[0] if state.auth.enabled else state.tls.hosts[0] if state.tls.enabled else ""
    auth = state.auth if state.auth.enabled else None
    return ConnectionCode(addresses, port, host_nqn, auth.secret if auth else "", auth.ctrl_secret if auth else "",
                          state.tls.key)  # fmt: skip


def code_text(state: RunState) -> str:
    """The encoded code of a state, or "" if there is none to show (no address yet, or the
    secrets are hidden in this copy of the state)."""
    try:
        return encode(for_state(state))
    except ValueError:
        return ""


def screen_lines(state: RunState, width: int = 80) -> list[str]:
    """The code as the target's screen shows it: one heading, then rows split at dashes."""
    text = code_text(state)
    if not text:
        return []
    rows, row = [], ""
    for group in text.split("-"):
        piece = f"{row}-{group}" if row else group
        if row and len(piece) + 2 > width:
            rows.append(f"  {row}-")
            piece = group
        row = piece
    rows.append(f"  {row}")
    # `-`: the code, secrets and all, is typed at the prompt, not into argv (which every user reads).
    return ["Or, with storagetm on the other machine: storagetm connect -, then type CODE:", *rows]
