"""iSCSI CHAP secrets, derived from the secret (or TLS key) NVMe/TCP requires, so that one
option protects both fabrics alike and a restart keeps the same secrets.

Microsoft's iSCSI Initiator takes CHAP secrets of 12 to 16 characters; they are read off
the screen and typed, so they are 16 characters of an alphabet without look-alikes
(0/O, 1/l/I): about 93 bits."""

from __future__ import annotations

from storagetm.security.auth import AuthConfig
from storagetm.security.digest import hmac_digest
from storagetm.security.tls import TLSConfig

CHAP_USER = "storagetm"  # the CHAP name an initiator logs in with, and the target's for mutual CHAP
SECRET_LENGTH = 16
ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def derive_secret(source: str, purpose: str) -> str:
    number = int.from_bytes(hmac_digest(source.encode(), f"storagetm-iscsi-chap:{purpose}".encode()))
    chars = []
    for _ in range(SECRET_LENGTH):
        number, index = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[index])
    return "".join(chars)


def chap_secrets(auth: AuthConfig, tls: TLSConfig) -> tuple[str, str]:
    """(initiator secret, target secret for mutual CHAP); ("", "") when NVMe/TCP lets anyone
    in. With TLS alone NVMe/TCP admits only who has the key: iSCSI, which has no TLS, then
    asks for a CHAP secret shown beside the key, never less than NVMe/TCP asks."""
    if auth.enabled:
        mutual = derive_secret(auth.ctrl_secret, "target") if auth.ctrl_secret else ""
        return derive_secret(auth.secret, "initiator"), mutual
    if tls.enabled:
        return derive_secret(tls.key, "initiator"), ""
    return "", ""
