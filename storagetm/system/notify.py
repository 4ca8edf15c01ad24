"""sd_notify(3): READY/STATUS/STOPPING to systemd. Written out (a datagram to
$NOTIFY_SOCKET) so storagetm needs no python3-systemd on hosts that lack it."""

from __future__ import annotations

import os
import socket


def sd_notify(**fields: str) -> bool:
    """sd_notify(READY="1", STATUS="…"): True if a notification socket was there."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError:
            return False
    return True
