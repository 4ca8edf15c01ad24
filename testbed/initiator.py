"""What the initiator VM does with nvme-cli, and how the test reads the target's screen."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from testbed import VMError
from testbed.machine import VM
from testbed.terminal import screen
from testbed.wait import until

# TCG VMs on this shared 2-core host can stall for seconds. With nvme-cli's default 5 s
# keep-alive a stall starts the kernel's error recovery, which these tests do not check and
# which, rarely, never completes (a reconnect after pausing the target 15 s hung 1 time in 14).
CONNECT = "nvme connect -t tcp --keep-alive-tmo=30"
CONNECT_ALL = "nvme connect-all -t tcp --keep-alive-tmo=30"


@dataclass(frozen=True)
class Remote:
    nqn: str
    model: str
    serial: str
    block: str  # nvmeXnY on the initiator


def screen_addresses(target: VM) -> list[str]:
    """The addresses the target's screen tells the operator to use, as printed."""
    found = re.findall(r"nvme connect-all -t tcp -a (\S+(?: -f \S+)?)", target.console())
    return list(dict.fromkeys(found))


def wait_address(target: VM, prefix: str, timeout: float = 120) -> str:
    """The first address starting with `prefix` that the target's screen shows, as printed.
    Addresses appear some seconds after the disks (IPv4 link-local probes for ARP conflicts)."""
    return until(lambda: next((a for a in screen_addresses(target) if a.startswith(prefix)), ""), timeout,
                 f"the target's screen showed no {prefix}… address within {timeout:.0f} s")  # fmt: skip


def prepare_initiator(initiator: VM, timeout: float = 120) -> None:
    """nvme-tcp loaded, and the initiator's own link-local addresses usable (DAD and IPv4LL
    probing done): connecting from a tentative address fails with EADDRNOTAVAIL."""
    initiator.sh("modprobe nvme_tcp")
    addrs = ""

    def ready() -> bool:
        nonlocal addrs
        addrs, _ = initiator.run("ip -o addr show dev enp0s3")  # not there until udev renamed it
        return "169.254." in addrs and "fe80::" in addrs and "tentative" not in addrs

    until(ready, timeout, lambda: f"the initiator's link-local addresses are not ready: {addrs}")


def screen_rows_joined(target: VM) -> str:
    """The console with its rows run together: the dashboard splits commands longer than
    80 columns over several rows, and this puts them back in one piece. The stream as it
    came, then the screen it leaves: the dashboard does not redraw a row that did not change,
    and a command's continuation row may be the same as the row it replaces."""
    return "".join(target.console().splitlines()) + "\n" + "".join(screen(target.raw_console()))


CONNECTED = (
    'for s in /sys/class/nvme-subsystem/nvme-subsys*; do [ -e "$s" ] || continue; '
    'case "$(cat $s/subsysnqn)" in *nvmexpress.discovery) continue;; esac; found=; '
    'for n in $s/nvme*n*; do [ -e "$n" ] || continue; found=1; '
    'echo "$(cat $s/subsysnqn)|$(cat $s/model)|$(cat $s/serial)|$(basename $n)"; done; '
    '[ -n "$found" ] || echo "scanning|$(cat $s/subsysnqn)"; done'
)


def connected(initiator: VM, settle: float = 10) -> list[Remote]:
    """The namespaces of every connected subsystem. A controller's namespaces appear once
    the kernel's scan of it is done, a moment after `nvme connect-all` returned: wait up to
    `settle` seconds for each connected subsystem to show one (one whose disk was pulled
    shows none for good)."""
    lines: list[str] = []

    def scanned() -> bool:
        nonlocal lines
        lines = initiator.sh(CONNECTED).splitlines()
        return not any(line.startswith("scanning|") for line in lines)

    with contextlib.suppress(VMError):  # one whose disk was pulled shows none for good
        until(scanned, settle, "", pause=0.5)
    remotes = []
    for line in lines:
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 4 and parts[0].startswith("nqn."):
            remotes.append(Remote(*parts))
    return remotes


def disconnect_all(initiator: VM) -> None:
    initiator.sh("nvme disconnect-all")
