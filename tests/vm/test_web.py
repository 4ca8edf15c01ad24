"""The web page on a real target: from the initiator VM the page lists every disk; a download
broken off halfway and resumed with a Range request is the disk byte for byte, read-write and
read-only alike; the target's own sha256 is the disk's, and its screen shows it under the disk;
the VHD is the disk and its footer.
And a real browser (the host's headless chromium) renders the page, reaching the target only
through a restricted user-mode NIC that forwards one port of 127.0.0.1 to the target's 80:
its DOM lists the disks, its screenshot is docs/web-page.png (the README shows it)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from testbed.initiator import CONNECT_ALL, connected, disconnect_all, wait_address
from testbed.machine import forwarded_nic, free_port
from testbed.pair import BOOT_TIMEOUT, LOGS, REPO, TARGET_APPEND, TARGET_LINK_LOCAL, Pair, report, vm_pair
from testbed.terminal import screen
from testbed.wait import until
from testbed.web import fetch, install_client

pytestmark = pytest.mark.vm

DISKS = {"WEB00001": "virtio", "WEB00002": "nvme"}
TARGET_APPEND = f"{TARGET_APPEND} storagetm.mode=rw,WEB00002=ro"
SCREENSHOT = REPO / "docs" / "web-page.png"
SIZE = 32 << 20  # testbed.pair.DISK_SIZE


@pytest.fixture(scope="module")
def forward() -> int:
    """The host's end of the target's user-mode NIC: 127.0.0.1:PORT is the target's port 80."""
    return free_port()


@pytest.fixture(scope="module")
def booted_pair(request: pytest.FixtureRequest, forward: int) -> Iterator[Pair]:
    """As conftest's, with the target's second, forwarded NIC."""
    with vm_pair(LOGS / "test_web", DISKS, TARGET_APPEND, target_extra=forwarded_nic(forward, 80)) as p:
        install_client(p.initiator)
        yield p
        failed = request.session.testsfailed
    if failed:
        report(p.target, p.initiator)


def names(pair: Pair) -> dict[str, str]:
    """serial -> the disk's name on the target (its name in the page's links)."""
    pair.target.wait_for(rf"Exported disks \({len(DISKS)}\)", BOOT_TIMEOUT)
    status = json.loads(pair.target.sh("storagetm status --json"))
    return {e["disk"]["serial"]: e["disk"]["name"] for e in status["exports"]}


def base(pair: Pair) -> str:
    return f"http://{wait_address(pair.target, '169.254.')}"


def test_the_page_lists_every_disk(pair: Pair) -> None:
    found = names(pair)
    reply = fetch(pair.initiator, f"{base(pair)}/")
    assert reply.status == 200, reply
    for serial, name in found.items():
        assert f'href="/disks/{name}.img"' in reply.text and serial in reply.text, reply.text
    assert "read-only" in reply.text and "read-write" in reply.text


def test_the_page_answers_over_ipv4_and_ipv6_on_one_socket(pair: Pair) -> None:
    names(pair)
    # fe80::…%IFACE on the NIC to the initiator (whose NIC is named alike), not the forwarded one's.
    ipv6 = wait_address(pair.target, f"{TARGET_LINK_LOCAL}%").split()[0]
    for url in (f"{base(pair)}/", f"http://[{ipv6}]/"):
        assert fetch(pair.initiator, url).status == 200, url
    listening = pair.target.sh("ss -Htln 'sport = :80'").strip().splitlines()
    assert len(listening) == 1, listening  # one dual-stack socket


def test_status_json_is_storagetm_status_without_secrets(pair: Pair) -> None:
    names(pair)
    reply = fetch(pair.initiator, f"{base(pair)}/status.json")
    served, local = json.loads(reply.text), json.loads(pair.target.sh("storagetm status --json"))
    assert reply.status == 200 and [e["nqn"] for e in served["exports"]] == [e["nqn"] for e in local["exports"]]
    assert served["web"]["port"] == 80


@pytest.mark.parametrize("serial", sorted(DISKS))
def test_a_download_broken_off_halfway_resumes_to_the_disk(pair: Pair, serial: str) -> None:
    name, url = names(pair)[serial], f"{base(pair)}/disks/{names(pair)[serial]}.img"
    out = f"/var/tmp/{name}.img"
    pair.initiator.sh(f"rm -f {out}")
    first = fetch(pair.initiator, url, out=out, limit=SIZE // 2 + 4096 * 3 + 17)  # dropped mid-body
    assert first.status == 200 and first.headers["content-length"] == str(SIZE)
    assert first.headers["accept-ranges"] == "bytes"
    have = int(pair.initiator.sh(f"stat -c %s {out}"))
    assert 0 < have < SIZE
    rest = fetch(pair.initiator, url, {"Range": f"bytes={have}-"}, out=out, append=True)
    assert rest.status == 206 and rest.headers["content-range"] == f"bytes {have}-{SIZE - 1}/{SIZE}"
    assert pair.initiator.sh(f"sha256sum {out}").split()[0] == pair.sum_now(serial)
    pair.initiator.sh(f"rm -f {out}")


def test_a_download_after_the_initiator_wrote_has_the_new_bytes(pair: Pair) -> None:
    """The kernel's target writes around the target's page cache: a download read earlier
    (its pages cached) must not hand out what was there before the initiator wrote."""
    name, url = names(pair)["WEB00001"], f"{base(pair)}/disks/{names(pair)['WEB00001']}.img"
    out = f"/var/tmp/{name}.img"
    assert fetch(pair.initiator, url, out=out).status == 200  # every page of the disk now cached
    assert pair.initiator.sh(f"sha256sum {out}").split()[0] == pair.sum_now("WEB00001")
    pair.initiator.sh(f"{CONNECT_ALL} -a {wait_address(pair.target, '169.254.')}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "WEB00001")
        pair.initiator.sh(f"dd if=/dev/urandom of=/dev/{remote.block} bs=1M count=2 seek=3 oflag=direct,sync "
                          "status=none")  # fmt: skip
    finally:
        disconnect_all(pair.initiator)
    written = pair.sum_now("WEB00001")
    assert fetch(pair.initiator, url, out=out).status == 200
    assert pair.initiator.sh(f"sha256sum {out}; rm -f {out}").split()[0] == written


def test_a_range_past_the_end_is_416(pair: Pair) -> None:
    name = names(pair)["WEB00001"]
    reply = fetch(pair.initiator, f"{base(pair)}/disks/{name}.img", {"Range": f"bytes={SIZE}-"})
    assert reply.status == 416 and reply.headers["content-range"] == f"bytes */{SIZE}"


def target_sha256(pair: Pair, name: str) -> str:
    """The sha256 the target computes of its disk `name`, asked for over HTTP until done."""
    deadline = time.monotonic() + 300
    while (reply := fetch(pair.initiator, f"{base(pair)}/disks/{name}.sha256")).status == 202:
        assert time.monotonic() < deadline, reply
        time.sleep(2)
    assert reply.status == 200 and reply.text.split()[1] == f"{name}.img", reply
    return reply.text.split()[0]


def test_the_targets_sha256_is_the_disks(pair: Pair) -> None:
    name = names(pair)["WEB00002"]
    assert target_sha256(pair, name) == pair.sum_now("WEB00002")


def sha256_rows(rows: list[str], name: str) -> list[str]:
    """The sha256 rows under the disk's own row on the dashboard (`  NAME …` or `  1 NAME …`
    with the keys line), up to the next row that is not one of its own (indented by four)."""
    start = next((i for i, row in enumerate(rows) if re.match(rf"  (\d )?{re.escape(name)} ", row)), None)
    if start is None:
        return []
    own = itertools.takewhile(lambda row: row.startswith("    "), rows[start + 1 :])
    return [row for row in own if row.startswith("    sha256 ")]


def test_the_targets_screen_shows_the_sha256_the_page_gave(pair: Pair) -> None:
    """The person at the target compares the checksum the other machine got: the target's own
    screen shows, under each disk, the whole digest its HTTP reply gave, for both disks at once."""
    found = names(pair)
    digests = {found[serial]: target_sha256(pair, found[serial]) for serial in sorted(DISKS)}
    assert digests == {found[serial]: pair.sum_now(serial) for serial in DISKS}
    rows: list[str] = []

    def shown() -> bool:
        nonlocal rows
        rows = screen(pair.target.raw_console())
        return all(sha256_rows(rows, name) == [f"    sha256 {digest}"] for name, digest in digests.items())

    until(shown, 30, lambda: "the target's screen shows no sha256 row with the digest under each disk:\n"
          + "\n".join(rows))  # fmt: skip


def test_the_vhd_is_the_disk_and_a_footer(pair: Pair) -> None:
    name = names(pair)["WEB00001"]
    out = f"/var/tmp/{name}.vhd"
    reply = fetch(pair.initiator, f"{base(pair)}/disks/{name}.vhd", out=out)
    assert reply.status == 200 and reply.length == SIZE + 512
    assert pair.initiator.sh(f"head -c {SIZE} {out} | sha256sum").split()[0] == pair.sum_now("WEB00001")
    assert pair.initiator.sh(f"tail -c 512 {out} | head -c 8") == "conectix"
    pair.initiator.sh(f"rm -f {out}")


def test_no_other_path_is_served(pair: Pair) -> None:
    names(pair)
    for path in ("/disks/vdz.img", "/disks/..%2f..%2fetc%2fshadow.img", "/etc/shadow", "/disks/"):
        assert fetch(pair.initiator, f"{base(pair)}{path}").status == 404, path


def chromium(*args: str) -> str:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed on this host: run ci/setup-host.sh")
    with tempfile.TemporaryDirectory(prefix="storagetm-chromium-") as profile:
        result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                 *args], capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_browser_renders_the_page(pair: Pair, forward: int) -> None:
    """The browser asks for the target's mDNS name, as a user would type it; its resolver
    maps that name to the forward (the page's commands then show the name, not 127.0.0.1)."""
    found = names(pair)
    name = json.loads(pair.target.sh("storagetm status --json"))["announced"] or "storagetm.local"
    to_forward = f"--host-resolver-rules=MAP {name} 127.0.0.1:{forward}"
    dom = chromium(to_forward, "--dump-dom", f"http://{name}/")
    for serial, disk in found.items():
        assert f'href="/disks/{disk}.img"' in dom and serial in dom, dom[-3000:]
    SCREENSHOT.unlink(missing_ok=True)
    chromium(to_forward, f"--screenshot={SCREENSHOT}", "--window-size=900,1100", "--hide-scrollbars", f"http://{name}/")
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 20_000


def test_the_target_reaches_nothing_through_the_forwarded_nic(pair: Pair) -> None:
    """restrict=on: the browser's way in is no way out. QEMU's 10.0.2.2 is the host; a port
    the host listens on (on 127.0.0.1, where an unrestricted user-mode NIC would lead) stays
    out of the target's reach."""
    names(pair)
    assert " 10.0.2." in pair.target.sh("ip -o -4 addr show"), "the forwarded NIC has no address from QEMU's DHCP"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        out, rc = pair.target.run(f"python3 -c \"import socket; socket.create_connection(('10.0.2.2', {port}), 5)\"")
    assert rc != 0, out
