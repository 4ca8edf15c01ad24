"""Where the web page is, as the screen and `storagetm status` show it: by the first IPv4
address (a browser takes no IPv6 link-local address) and by the mDNS name, with the token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storagetm.model import WEB_PORT
from storagetm.web.token import QUERY

if TYPE_CHECKING:
    from storagetm.state import RunState

WIDTH = 80
NO_DOWNLOADS = ("TLS is on: disks are not offered over plain HTTP; boot with storagetm.web=downloads "
                "(or --web-downloads) to allow it")  # fmt: skip


def urls(state: RunState) -> list[str]:
    """[] while the page is off. The token as the state holds it: hidden in a view without secrets."""
    web = state.web
    if not web.port:
        return []
    hosts = [a.address for a in state.addresses if a.family == "ipv4"][:1]
    hosts += [state.announced] if state.announced else []
    port = "" if web.port == WEB_PORT else f":{web.port}"
    path = f"/?{QUERY}={web.token}" if web.token else "/"
    return [f"http://{host}{port}{path}" for host in hosts]


def screen_lines(state: RunState) -> list[str]:
    """One line (the dashboard has few to spare): the address, and the name if it fits."""
    found = urls(state)
    if not found:
        return []
    line = f"Web page (any browser{'' if state.web.downloads else ', no downloads: TLS'}): {found[0]}"
    for url in found[1:]:
        if len(line) + len(url) + 4 <= WIDTH:
            line += f"  or {url}"
    return [line]
