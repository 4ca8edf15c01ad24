"""Authentication (DH-HMAC-CHAP): without the secret, with a wrong one, or from a host NQN
that is not allowed, an initiator sees no namespace; with the line from the screen, reads
and writes work. iSCSI, offered beside it, then requires CHAP with the secrets the screen
shows: without them, or with a wrong one, no login succeeds."""

from __future__ import annotations

import json
import re

import pytest

from storagetm.security.auth import generate_secret
from storagetm.security.chap import derive_secret
from storagetm.security.keys import HIDDEN
from testbed.initiator import CONNECT, CONNECT_ALL, connected, disconnect_all, screen_rows_joined, wait_address
from testbed.iscsi import discover, login, logout_all, prepare_iscsi
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, Pair
from testbed.web import fetch, install_client

pytestmark = pytest.mark.vm

DISKS = {"AUTH0001": "virtio"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.auth=1 storagetm.auth_ctrl=1"


def screen_auth(pair: Pair) -> tuple[str, str, str, str]:
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    wait_address(pair.target, "169.254.")
    # Parsed from `storagetm status` (the same screen, unsplit); the console must show it too.
    screen = pair.target.sh("storagetm status --show-secrets")
    line = re.search(r"nvme connect-all -t tcp -a (169\.254\.\S+) --hostnqn=(\S+) --dhchap-secret=(\S+)", screen)
    ctrl = re.search(r"nvme connect -t tcp .* --dhchap-ctrl-secret=(\S+) -n NQN", screen)
    assert line and ctrl, screen
    assert line.group(0) in screen_rows_joined(pair.target)
    return line.group(1), line.group(2), line.group(3), ctrl.group(1)


def pair_nqn(pair: Pair) -> str:
    return str(json.loads(pair.target.sh("storagetm status --json"))["exports"][0]["nqn"])


def test_connect_all_with_the_line_from_the_screen(pair: Pair) -> None:
    address, hostnqn, secret, _ = screen_auth(pair)
    pair.initiator.sh(f"{CONNECT_ALL} -a {address} --hostnqn={hostnqn} --dhchap-secret={secret}")
    try:
        assert [r.serial for r in connected(pair.initiator)] == ["AUTH0001"]
    finally:
        disconnect_all(pair.initiator)


def test_screen_says_who_can_connect(pair: Pair) -> None:
    screen_auth(pair)
    assert "Only an initiator with the host NQN and secret below can READ AND WRITE" in pair.target.console()


@pytest.mark.parametrize("case", ["no-secret", "wrong-secret", "wrong-ctrl-secret", "other-host"])
def test_refused_without_the_right_secret(pair: Pair, case: str) -> None:
    address, hostnqn, secret, ctrl = screen_auth(pair)
    args = {
        "no-secret": f"--hostnqn={hostnqn}",
        "wrong-secret": f"--hostnqn={hostnqn} --dhchap-secret={generate_secret()}",
        "wrong-ctrl-secret": f"--hostnqn={hostnqn} --dhchap-secret={secret} --dhchap-ctrl-secret={generate_secret()}",
        "other-host": f"--dhchap-secret={secret}",
    }[case]
    # Bidirectional authentication is per subsystem (`nvme connect`); the rest via connect-all.
    command = (
        f"connect -t tcp -a {address} -n {pair_nqn(pair)}" if "ctrl" in case else f"connect-all -t tcp -a {address}"
    )
    try:
        out, rc = pair.initiator.run(f"nvme {command} {args}", timeout=120)
        if "ctrl" in case:
            assert rc != 0, out
        assert connected(pair.initiator) == []
        assert pair.initiator.sh("ls /dev/ | grep -c '^nvme[0-9]*n[0-9]' || true").strip() == "0"
    finally:
        disconnect_all(pair.initiator)


def test_with_the_secret_reads_and_writes_work(pair: Pair) -> None:
    address, hostnqn, secret, _ = screen_auth(pair)
    pair.initiator.sh(f"{CONNECT_ALL} -a {address} --hostnqn={hostnqn} --dhchap-secret={secret}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "AUTH0001")
        assert pair.initiator.sh(f"sha256sum /dev/{remote.block}").split()[0] == pair.sums["AUTH0001"]
        dev = f"/dev/{remote.block}"
        pair.initiator.sh(f"printf authenticated-write | dd of={dev} bs=512 seek=8 conv=sync,fsync oflag=direct")
        readback = pair.initiator.sh(f"dd if={dev} bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 19")
        assert readback == "authenticated-write"
    finally:
        disconnect_all(pair.initiator)


def test_bidirectional_connect_with_the_controller_secret(pair: Pair) -> None:
    address, hostnqn, secret, ctrl = screen_auth(pair)
    pair.initiator.sh(f"{CONNECT} -a {address} -n {pair_nqn(pair)} --hostnqn={hostnqn} "
                      f"--dhchap-secret={secret} --dhchap-ctrl-secret={ctrl}")  # fmt: skip
    try:
        assert [r.serial for r in connected(pair.initiator)] == ["AUTH0001"]
    finally:
        disconnect_all(pair.initiator)


def screen_chap(pair: Pair) -> tuple[str, str, str]:
    """(address, CHAP secret, mutual CHAP secret) as the screen shows them for Windows."""
    screen_auth(pair)
    screen = pair.target.sh("storagetm status --show-secrets")
    windows = re.search(r"Windows: iSCSI Initiator → Quick Connect → (\S+)", screen)
    secret = re.search(r"name storagetm, secret (\S{16})$", screen, re.M)
    mutual = re.search(r"Configuration → CHAP → (\S{16}),", screen)
    assert windows and secret and mutual, screen
    return windows.group(1), secret.group(1), mutual.group(1)


def chap_login(pair: Pair, address: str, secret: str, mutual: str = "") -> tuple[str, int]:
    """Discovery (not authenticated: Windows' Quick Connect discovers first), then a login with
    CHAP `secret` (none: "") and, with `mutual`, the target's secret the initiator checks."""
    prepare_iscsi(pair.initiator)
    (iqn,) = discover(pair.initiator, address)
    node = f"iscsiadm -m node -T {iqn} -p {address}:3260 -o update"
    settings = {"authmethod": "CHAP" if secret else "None", "username": "storagetm", "password": secret}
    if mutual:
        settings |= {"username_in": "storagetm", "password_in": mutual}
    for name, value in settings.items():
        if value:
            pair.initiator.sh(f"{node} -n node.session.auth.{name} -v {value}")
    return pair.initiator.run(f"iscsiadm -m node -T {iqn} -p {address}:3260 --login", timeout=120)


@pytest.mark.parametrize("case", ["no-chap", "wrong-secret", "wrong-mutual-secret"])
def test_iscsi_login_refused_without_the_right_chap_secret(pair: Pair, case: str) -> None:
    address, secret, mutual = screen_chap(pair)
    wrong = derive_secret(case, "initiator")
    args = {"no-chap": ("",), "wrong-secret": (wrong,), "wrong-mutual-secret": (secret, wrong)}[case]
    try:
        out, rc = chap_login(pair, address, *args)
        assert rc != 0, out
        assert pair.initiator.run("iscsiadm -m session")[1] != 0  # no session
    finally:
        logout_all(pair.initiator)


@pytest.mark.parametrize("mutual", [False, True], ids=["chap", "mutual-chap"])
def test_iscsi_with_the_chap_secret_from_the_screen_reads_the_disk(pair: Pair, mutual: bool) -> None:
    address, secret, target_secret = screen_chap(pair)
    try:
        out, rc = chap_login(pair, address, secret, target_secret if mutual else "")
        assert rc == 0, out
        (iqn,) = discover(pair.initiator, address)
        device = login(pair.initiator, iqn, f"{address}:3260")  # logged in already: finds its disk
        assert pair.initiator.sh(f"sha256sum {device}").split()[0] == pair.sum_now("AUTH0001")
    finally:
        logout_all(pair.initiator)


def test_only_storagetm_listens(pair: Pair) -> None:
    ports = set(re.findall(r":(\d+)\s", pair.target.sh("ss -Htln")))
    assert ports == {"4420", "8009", "3260", "80"}, ports  # NVMe/TCP I/O, discovery, iSCSI, the web page
    # UDP: networkd's DHCP client and resolved's mDNS responder (the announcement), nothing else.
    udp = pair.target.sh("ss -Hulnp")
    others = [line for line in udp.splitlines()
              if "systemd-network" not in line and not re.search(r":5353\s.*systemd-resolve", line)]  # fmt: skip
    assert others == [], udp
    assert re.search(r":5353\s", udp), udp


def test_the_web_page_gives_nothing_without_its_token(pair: Pair) -> None:
    """With authentication on, every page and download asks for the token; the address the
    screen shows carries it, sets the cookie once, and then the disk downloads."""
    address = screen_auth(pair)[0]
    install_client(pair.initiator)
    shown = json.loads(pair.target.sh("storagetm status --json --show-secrets"))["web"]
    hidden = pair.target.sh("storagetm status --json")
    token = shown["token"]
    assert token and token not in hidden and json.loads(hidden)["web"]["token"] == HIDDEN
    (url,) = [u for u in shown["urls"] if f"//{address}/" in u]
    assert url == f"http://{address}/?token={token}" and url in screen_rows_joined(pair.target)
    name = json.loads(hidden)["exports"][0]["disk"]["name"]
    paths = ["/", "/status.json", f"/disks/{name}.img", f"/disks/{name}.vhd", f"/disks/{name}.sha256"]
    for path in paths:
        for headers in ({}, {"Cookie": "storagetm_token=wrong"}):
            reply = fetch(pair.initiator, f"http://{address}{path}", headers)
            assert reply.status == 403 and name not in reply.text, (path, headers, reply)
        assert fetch(pair.initiator, f"http://{address}{path}?token=x{token}").status == 403
    first = fetch(pair.initiator, url)
    assert first.status == 303 and first.headers["location"] == "/", first
    cookie = first.headers["set-cookie"].split(";")[0]
    assert cookie == f"storagetm_token={token}" and "HttpOnly" in first.headers["set-cookie"]
    page = fetch(pair.initiator, f"http://{address}/", {"Cookie": cookie})
    assert page.status == 200 and f'href="/disks/{name}.img"' in page.text and token not in page.text
    out = "/var/tmp/auth-web.img"
    assert fetch(pair.initiator, f"http://{address}/disks/{name}.img", {"Cookie": cookie}, out=out).status == 200
    assert pair.initiator.sh(f"sha256sum {out}; rm -f {out}").split()[0] == pair.sum_now("AUTH0001")
    assert token not in pair.target.sh("journalctl -b -u storagetm --no-pager -o cat")
