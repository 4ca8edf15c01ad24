"""SHA-1, SHA-2 and HMAC for names, identities and derived secrets, from the interpreter's
own implementations (`_sha1`, `_sha2`: HACL*, in CPython since 3.12) rather than OpenSSL's.
`import hashlib` (and `hmac`) loads OpenSSL's libcrypto, 4.6 MiB of a process's resident
memory (measured in the image: `import _hashlib`, 12.9 MiB against 8.3 for a bare
interpreter) for a few hashes of short strings. Where the data is large (the web page's
sha256 of a whole disk) hashlib's faster OpenSSL code is used instead, imported there. An
interpreter without these modules falls back to hashlib's."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

try:
    from _sha1 import sha1  # type: ignore[import-not-found,unused-ignore]

    from _sha2 import sha256, sha384  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # before 3.12
    from hashlib import sha1, sha256, sha384

__all__ = ["hmac_digest", "sha1", "sha256", "sha256_hex", "sha384", "uuid5"]

Hash = Callable[..., Any]  # a hash's constructor: sha256, sha384, sha1


def hmac_digest(key: bytes, message: bytes, algorithm: Hash = sha256) -> bytes:
    """HMAC (RFC 2104), as `hmac.new(key, message, algorithm).digest()`."""
    block = algorithm().block_size
    if len(key) > block:
        key = algorithm(key).digest()
    key = key.ljust(block, b"\0")
    inner = algorithm(bytes(k ^ 0x36 for k in key) + message).digest()
    return bytes(algorithm(bytes(k ^ 0x5C for k in key) + inner).digest())


def sha256_hex(text: str) -> str:
    return str(sha256(text.encode()).hexdigest())


def uuid5(namespace: uuid.UUID, name: str) -> uuid.UUID:
    """As `uuid.uuid5` (which imports hashlib for its SHA-1)."""
    return uuid.UUID(bytes=bytes(sha1(namespace.bytes + name.encode()).digest())[:16], version=5)
