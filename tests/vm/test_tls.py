"""TLS 1.3 with a pre-shared key: the initiator follows the target's screen and reads every
byte; without the key nothing connects; and a capture of the link during a read holds no
plaintext (test_export.py's capture of the same read without TLS is the control)."""

from __future__ import annotations

import json
import re

import pytest

from storagetm.model import DISCOVERY_NQN
from testbed.capture import capture, marker, read_remote, write_marker
from testbed.initiator import CONNECT_ALL, connected, disconnect_all, screen_rows_joined, wait_address
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair

pytestmark = pytest.mark.vm

DISKS = {"TLS00001": "virtio"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.tls=1"


def screen_tls(pair: Pair) -> tuple[str, str, str]:
    """Host NQN, key and IPv4 link-local address, as the target's screen shows them."""
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "169.254.")
    # Parsed from `storagetm status` (the same screen, unsplit); the console must show it too.
    screen = pair.target.sh("storagetm status --show-secrets")
    shown = re.search(r"nvme check-tls-key -i -n (\S+) -d (NVMeTLSkey-1:\S+:) -c NQN", screen)
    assert shown, screen
    assert shown.group(0) in screen_rows_joined(pair.target)
    return shown.group(1), shown.group(2), address


def test_screen_and_ports_say_tls(pair: Pair) -> None:
    host, key, address = screen_tls(pair)
    console = screen_rows_joined(pair.target)
    assert "Only an initiator with the host NQN and TLS key below" in console
    # iSCSI, on beside NVMe/TCP, has no TLS: the screen says which traffic is encrypted.
    assert "NVMe/TCP traffic is encrypted (TLS 1.3); iSCSI traffic (port 3260) is not" in console
    assert re.search(rf"nvme connect-all -t tcp -a {re.escape(address)} --hostnqn={re.escape(host)} --tls", console)
    status = json.loads(pair.target.sh("storagetm status --show-secrets --json"))
    assert status["tls"] == {"key": key, "hosts": [host], "enabled": True}
    tsas = pair.target.sh("cat /sys/kernel/config/nvmet/ports/*/addr_tsas").split()
    assert len(tsas) >= 2 and set(tsas) == {"tls1.3"}, tsas  # the I/O port and each discovery port
    assert pair.target.sh("cat /sys/kernel/config/nvmet/ports/*/addr_treq").split().count("required") == len(tsas)


def refused(pair: Pair, address: str, host: str, tls: str) -> None:
    disconnect_all(pair.initiator)
    _, rc = pair.initiator.run(f"{CONNECT_ALL} -a {address} --hostnqn={host}{tls}")
    assert rc != 0
    assert connected(pair.initiator) == []


def test_refused_without_tls(pair: Pair) -> None:
    host, _, address = screen_tls(pair)
    refused(pair, address, host, "")


def test_with_the_key_every_byte_arrives_and_the_wire_shows_no_plaintext(pair: Pair) -> None:
    """TLS without the key is refused first, here: the initiator's keyring cannot forget the
    key once this test has put it there, so a test of its own would pass only before this one."""
    host, key, address = screen_tls(pair)
    refused(pair, address, host, " --tls")
    nqn = json.loads(pair.target.sh("storagetm status --json"))["exports"][0]["nqn"]
    for subsystem in (DISCOVERY_NQN, nqn):  # as the screen says: the discovery NQN and each disk's
        pair.initiator.sh(f"nvme check-tls-key -i -n {host} -d {key} -c {subsystem}")
    disconnect_all(pair.initiator)
    pair.initiator.sh(f"{CONNECT_ALL} -a {address} --hostnqn={host} --tls")
    try:
        (remote,) = connected(pair.initiator)
        assert pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300).split()[0] == pair.sums["TLS00001"]
        text = marker()
        write_marker(pair.initiator, remote, text)
        with capture(pair.target, "tls-read") as pcap:
            assert read_remote(pair.initiator, remote).decode() == text.decode().rstrip("|")
        captured = pcap.read_bytes()
        assert len(captured) > 8 << 20, "the capture missed the read"  # the 8 MiB read crossed the link
        assert text not in captured and text[:24] not in captured
    finally:
        disconnect_all(pair.initiator)
    assert "Handshake with" in pair.target.sh("journalctl -u tlshd --no-pager | tail -n 5")
