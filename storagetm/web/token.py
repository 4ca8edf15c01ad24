"""The web page's token: with authentication or TLS on, every page and download asks for it.
Derived from the same secret as iSCSI's CHAP secrets (so a restart keeps it, and nobody has
to type a second secret), for a purpose of its own (knowing it tells nothing of the others)."""

from __future__ import annotations

from storagetm.security.auth import AuthConfig
from storagetm.security.chap import derive_secret
from storagetm.security.tls import TLSConfig

PURPOSE = "web"
COOKIE = "storagetm_token"
QUERY = "token"


def web_token(auth: AuthConfig, tls: TLSConfig) -> str:
    """"" when anyone may connect: the page is then as open as the disks."""
    if auth.enabled:
        return derive_secret(auth.secret, PURPOSE)
    if tls.enabled:
        return derive_secret(tls.key, PURPOSE)
    return ""


def matches(given: str, token: str) -> bool:
    """In constant time; an empty token is never given (the caller lets everyone in then)."""
    import hmac  # here, in the web server: its import loads OpenSSL (storagetm.security.digest)

    return bool(token) and hmac.compare_digest(given.encode(), token.encode())
