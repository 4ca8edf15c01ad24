"""HTTP from inside a VM: a small client (the image has python3, no curl) that the test
installs on the initiator and runs through its shell. It does not follow redirects, can
stop reading a body part-way (a broken download) and append to a file (a resumed one)."""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import dataclass
from typing import Any

from testbed.machine import VM

CLIENT_PATH = "/run/storagetm-webget.py"
CLIENT = '''\
import http.client, json, sys, urllib.parse
url, headers, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
append, limit = sys.argv[4] == "1", int(sys.argv[5])
u = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
conn.request(sys.argv[6], u.path + ("?" + u.query if u.query else ""), headers=headers)
r = conn.getresponse()
body = r.read(limit) if limit >= 0 else r.read()
conn.close()
if out:
    with open(out, "ab" if append else "wb") as f:
        f.write(body)
heads = {k.lower(): v for k, v in r.getheaders()}
text = body[:8000].decode("utf-8", "replace")
print(json.dumps({"status": r.status, "headers": heads, "length": len(body), "text": text}))
'''


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    length: int  # bytes of body read
    text: str  # its first 8000 bytes, as text


def install_client(vm: VM) -> None:
    encoded = base64.b64encode(CLIENT.encode()).decode()
    vm.sh(f"echo {encoded} | base64 -d > {CLIENT_PATH}")


def fetch(vm: VM, url: str, headers: dict[str, str] | None = None, *, out: str = "", append: bool = False,
          limit: int = -1, method: str = "GET", timeout: float = 600) -> Reply:  # fmt: skip
    """One request from `vm`; with `out`, the body goes to that file; with `limit`, only that
    many bytes of it are read before the connection is dropped."""
    args = [url, json.dumps(headers or {}), out, "1" if append else "0", str(limit), method]
    line = vm.sh(f"python3 {CLIENT_PATH} {' '.join(shlex.quote(a) for a in args)}", timeout=timeout)
    data: dict[str, Any] = json.loads(line.strip().splitlines()[-1])
    return Reply(int(data["status"]), dict(data["headers"]), int(data["length"]), str(data["text"]))
