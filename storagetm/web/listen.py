"""The web page's listening socket, bound at start with nothing but `socket`.

The server behind it (http.server, email, ssl, a thread polling for a stop) is made only when
the first connection comes in: until then nobody has asked for the page, and its imports were a
second of the target's CPU under TCG at every boot. The port is still taken at start, so a port
in use is said at once, and a connection that comes early waits in the socket's queue."""

from __future__ import annotations

import socket

from storagetm.system.log import Logger

log = Logger(__name__)

REQUEST_QUEUE = 16  # connections that may wait to be accepted (the server takes 16 at once)


def listen(host: str | None, port: int) -> socket.socket:
    """A listening socket on `host` (None: every address, IPv6 and IPv4 on one socket); OSError
    if the port cannot be had."""
    if host is not None:
        return _listening(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))
    try:
        return _listening(socket.AF_INET6, ("::", port))
    except OSError as exc:  # booted with IPv6 off
        log.debug("web: no IPv6 socket (%s); IPv4 only", exc.strerror)
        return _listening(socket.AF_INET, ("0.0.0.0", port))


def _listening(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
        sock.bind(address)
        sock.listen(REQUEST_QUEUE)
    except OSError:
        sock.close()
        raise
    return sock
