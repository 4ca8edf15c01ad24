"""NVMe/TCP with TLS 1.3 and a pre-shared key (NVMe/TCP TP 8011).

The kernel does the record layer, tlshd (Debian ktls-utils) the handshake. The target
finds the PSK by the identity the host presents, `NVMe0R01 <hostnqn> <subsysnqn>`, in
the kernel's `.nvme` keyring. So each (host, subsystem) pair needs its own derived key,
the discovery subsystem included, and storagetm must know the host NQN: it uses the
allowed hosts, or makes one up and shows it. nvme-cli derives and inserts the keys the
same way on both sides (`nvme check-tls-key --insert`), so both sides agree.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import subprocess
from collections.abc import Callable
from typing import Any, NamedTuple

from storagetm.errors import StorageTMError, UsageError
from storagetm.security import digest, keys
from storagetm.security.auth import generated_host_nqn, read_credential

KEY_RE = re.compile(r"^NVMeTLSkey-1:0[12]:[A-Za-z0-9+/]+={0,2}:$")
CREDENTIAL_KEY = "storagetm.tls-key"
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


class TLSError(StorageTMError):
    pass


def generate_key() -> str:
    """A configured PSK as `nvme gen-tls-key` prints it: 32 random bytes, hash 01 (SHA-256)."""
    return keys.generate("NVMeTLSkey-1:01:")


def check_key(key: str) -> str:
    key = keys.check(key, KEY_RE, (32, 48), "TLS key", "NVMeTLSkey-1:01:<base64>: as `nvme gen-tls-key` makes it")
    if len(keys.key_bytes(key)) != _hash(key)().digest_size:  # nvme-cli refuses these too
        raise UsageError("invalid TLS key: 01 keys have 32 bytes, 02 keys 48", hint="make one with nvme gen-tls-key")
    return key


def key_argument(value: str) -> str:
    """--tls-key=KEY or =@FILE."""
    return check_key(keys.from_argument(value, "TLS key"))


def _hash(key: str) -> Callable[[], Any]:
    algorithm: Callable[[], Any] = digest.sha384 if key.split(":")[1] == "02" else digest.sha256
    return algorithm


def _hkdf(algorithm: Callable[[], Any], key: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Extract (no salt) and HKDF-Expand."""
    prk = digest.hmac_digest(bytes(algorithm().digest_size), key, algorithm)
    out, block = b"", b""
    for counter in range(1, -(-length // len(prk)) + 1):
        block = digest.hmac_digest(prk, block + info + bytes([counter]), algorithm)
        out += block
    return out[:length]


def _label(length: int, label: str, context: str) -> bytes:
    # nvme-cli 2.13 (libnvme 1.13) builds HKDF-Expand-Label's info without RFC 8446's
    # length bytes before label and context, and the length little-endian (its host order
    # on x86 and arm64). The target must derive what the initiator's nvme-cli derives.
    return struct.pack("<H", length) + b"tls13 " + label.encode() + context.encode()


def psk_identity(key: str, hostnqn: str, subnqn: str) -> str:
    """The identity `NVMe0R0<h> <hostnqn> <subnqn>` tlshd finds the pair's PSK under."""
    return f"NVMe0R{key.split(':')[1]} {hostnqn} {subnqn}"


def derive_psk(key: str, hostnqn: str, subnqn: str) -> tuple[str, bytes]:
    """The identity and the TLS PSK tlshd finds under it: the configured key turned into
    the retained key for the host, then into the PSK for the pair (identity version 0, as
    `nvme check-tls-key` uses by default)."""
    digest, configured = _hash(key), keys.key_bytes(key)
    identity = psk_identity(key, hostnqn, subnqn)
    retained = _hkdf(digest, configured, _label(len(configured), "HostNQN", hostnqn), len(configured))
    return identity, _hkdf(digest, retained, _label(len(configured), "nvme-tls-psk", identity), len(configured))


class TLSConfig(NamedTuple):  # the initiator side imports this module: the standard library only
    """The PSK and the host NQNs it is derived for. No key: TLS is off."""

    key: str = ""
    hosts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    def without_secrets(self) -> TLSConfig:
        return TLSConfig(keys.hidden(self.key), self.hosts)


def resolve(enabled: bool, key: str, hosts: tuple[str, ...], previous: TLSConfig | None) -> TLSConfig:
    """Given key first, then the systemd credential, then the previous instance's (so a
    restart keeps initiators connected), else a new one; likewise the host NQNs."""
    if not enabled:
        return TLSConfig()
    before = previous if previous is not None and previous.enabled else TLSConfig()
    from_credential = read_credential(CREDENTIAL_KEY)
    key = key or (from_credential and check_key(from_credential)) or before.key or generate_key()
    return TLSConfig(key, hosts or before.hosts or (generated_host_nqn(),))


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


KEY_SPEC_SESSION_KEYRING = -3


class Keyring:
    """The kernel's `.nvme` keyring, through libkeyutils, called as libnvme calls it."""

    def __init__(self, name: str = ".nvme", library: Any = None) -> None:
        self.name = name
        self.library = library

    def _lib(self) -> Any:
        if self.library is None:
            self.library = ctypes.CDLL("libkeyutils.so.1", use_errno=True)
            self.library.add_key.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_int32]  # fmt: skip
            self.library.keyctl_search.restype = ctypes.c_long
            self.library.keyctl_search.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
        return self.library

    def add(self, description: str, payload: bytes) -> None:
        """Put a `psk` key into the keyring, replacing one with the same description."""
        lib = self._lib()
        keyring = self._keyring()
        self.revoke(description)
        if int(lib.add_key(b"psk", description.encode(), payload, len(payload), keyring)) <= 0:
            _raise_errno("cannot add the key")

    def _keyring(self) -> int:
        """The keyring, linked into our session keyring so that a search finds its keys."""
        lib = self._lib()
        keyring = int(lib.find_key_by_type_and_desc(b"keyring", self.name.encode(), 0))
        if keyring <= 0:
            raise OSError(ctypes.get_errno(), f"the kernel has no {self.name} keyring")
        if int(lib.keyctl_link(keyring, KEY_SPEC_SESSION_KEYRING)) < 0:
            _raise_errno(f"cannot link the {self.name} keyring")
        return keyring

    def _exact(self, description: str) -> int:
        """The key of exactly this description, or 0: the psk type finds a key whose
        description merely starts with the one asked for (...-n1 finds ...-n10)."""
        lib = self._lib()
        found = int(lib.keyctl_search(self._keyring(), b"psk", description.encode(), 0))
        return found if found > 0 and self._description(found) == description else 0

    def find(self, description: str) -> bool:
        try:
            return bool(self._exact(description))
        except OSError:
            return False

    def revoke(self, description: str) -> None:
        """Revoke the key of exactly this description; none is no error."""
        key = self._exact(description)
        if key and int(self._lib().keyctl_revoke(key)) < 0:
            _raise_errno("cannot revoke the key")

    def _description(self, key: int) -> str:
        """The key's description: keyctl_describe gives "type;uid;gid;perm;description"."""
        buffer = ctypes.create_string_buffer(4096)
        if int(self._lib().keyctl_describe(key, buffer, len(buffer))) < 0:
            return ""
        return buffer.value.decode(errors="replace").split(";", 4)[-1]


def _raise_errno(what: str) -> None:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


def insert_key(hostnqn: str, subnqn: str, key: str, keyring: Keyring | None = None) -> None:
    """Put the PSK derived for (host, subsystem) into the kernel's .nvme keyring."""
    identity, psk = derive_psk(key, hostnqn, subnqn)
    try:
        (keyring or Keyring()).add(identity, psk)
    except OSError as exc:
        raise TLSError(f"cannot put the TLS key for {subnqn} into the kernel keyring: {exc.strerror or exc}",
                       hint="TLS needs libkeyutils and a kernel with CONFIG_NVME_KEYRING") from exc  # fmt: skip


def ensure_handshake_daemon(run: Runner = _run) -> None:
    """tlshd does the handshakes; in the image it is started only when TLS is asked for."""
    try:
        if run(["systemctl", "is-active", "--quiet", "tlshd.service"]).returncode == 0:
            return
        result = run(["systemctl", "start", "tlshd.service"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    if result.returncode != 0:
        raise TLSError(f"tlshd is not running and cannot be started: {result.stderr.strip() or 'failed'}",
                       hint="install ktls-utils and start tlshd.service")  # fmt: skip
