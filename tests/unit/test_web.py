"""The web page on a fake state whose disks are regular files: the page lists them, downloads
honour Range (206, 416), a download resumed where it broke off is the disk byte for byte,
the VHD is the disk plus its footer, and with a token nothing passes without it."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storagetm.backing.modes import Mode
from storagetm.console.stats import DiskActivity
from storagetm.disks.disk import Disk
from storagetm.disks.identity import Identity
from storagetm.model import Backing, Export, HashProgress, WebConfig
from storagetm.security.auth import AuthConfig
from storagetm.security.tls import TLSConfig
from storagetm.state import RunState
from storagetm.system import log
from storagetm.system.network import Address
from storagetm.web import vhd
from storagetm.web.server import WebServer
from storagetm.web.token import COOKIE, web_token

SIZE = 3 << 20  # not a power of two's worth of sendfile chunks


def disk_file(path: Path, seed: bytes, size: int = SIZE) -> bytes:
    data = hashlib.shake_256(seed).digest(size)
    path.write_bytes(data)
    return data


def export_of(path: Path, name: str, mode: Mode = Mode.READ_WRITE) -> Export:
    disk = Disk(name, str(path), 0, "file", path.stat().st_size, model="Fake Disk", serial=f"SER-{name}")
    identity = Identity(f"nqn.2023-10.io.systemd:storagetm.test.{name}", "", "", "Fake Disk", f"SER-{name}", "1")
    return Export(disk, identity, mode)


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, bytes]:
    return {name: disk_file(tmp_path / f"{name}.raw", name.encode()) for name in ("vda", "vdb")}


@pytest.fixture
def state(tmp_path: Path, disks: dict[str, bytes]) -> RunState:
    exports = [export_of(tmp_path / f"{name}.raw", name) for name in disks]
    return RunState(exports={e.nqn: e for e in exports}, initiators=["169.254.7.7"])


@pytest.fixture
def server(state: RunState, tmp_path: Path) -> Iterator[WebServer]:
    web = WebServer(lambda: state, 0, host="127.0.0.1", helper=tmp_path / "storagetm.pyz", poll=0.02)
    web.start()
    yield web
    web.stop()


def get(web: WebServer, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    conn = http.client.HTTPConnection(*web.address, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_page_lists_every_disk_with_its_facts(server: WebServer, state: RunState) -> None:
    status, headers, body = get(server, "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'name="viewport"' in page and "<script" not in page
    for name in ("vda", "vdb"):
        assert f'href="/disks/{name}.img"' in page and f'href="/disks/{name}.vhd"' in page
        assert f"SER-{name}" in page
    assert "Fake Disk" in page and "3.0 MiB" in page and "read-write" in page
    assert "169.254.7.7" in page  # the initiator connected
    assert "hdiutil attach -imagekey diskimage-class=CRawDiskImage -nomount vda.img" in page


def test_read_progress_is_on_the_page(server: WebServer, state: RunState) -> None:
    nqn = next(iter(sorted(state.exports)))
    state.activity = {nqn: DiskActivity(SIZE // 2, 0, 2 << 20, 0.0, 0.5)}
    page = get(server, "/")[2].decode()
    assert '<progress max="100" value="50"></progress> 50% read, 2.0 MiB/s' in page


def test_status_json_is_the_state_without_secrets(server: WebServer, state: RunState) -> None:
    state.auth = AuthConfig("DHHC-1:00:secret:", "", ("nqn.host",))
    state.web = WebConfig(80, "")  # the token is checked: none here
    status, _, body = get(server, "/status.json")
    data = json.loads(body)
    assert status == 200 and data == json.loads(json.dumps(state.without_secrets().to_json()))
    assert "DHHC-1:00:secret:" not in body.decode()


def test_a_whole_download_is_the_disk(server: WebServer, disks: dict[str, bytes]) -> None:
    status, headers, body = get(server, "/disks/vda.img")
    assert status == 200 and body == disks["vda"]
    assert headers["content-length"] == str(SIZE) and headers["accept-ranges"] == "bytes"


def test_a_download_resumed_with_a_range_hashes_as_the_disk(server: WebServer, disks: dict[str, bytes]) -> None:
    half = SIZE // 2 + 12345
    status, headers, first = get(server, "/disks/vdb.img", {"Range": f"bytes=0-{half - 1}"})
    assert status == 206 and len(first) == half and headers["content-range"] == f"bytes 0-{half - 1}/{SIZE}"
    status, headers, rest = get(server, "/disks/vdb.img", {"Range": f"bytes={half}-"})
    assert status == 206 and headers["content-range"] == f"bytes {half}-{SIZE - 1}/{SIZE}"
    assert hashlib.sha256(first + rest).hexdigest() == hashlib.sha256(disks["vdb"]).hexdigest()


def test_a_suffix_range_is_the_end(server: WebServer, disks: dict[str, bytes]) -> None:
    status, _, body = get(server, "/disks/vda.img", {"Range": "bytes=-100"})
    assert status == 206 and body == disks["vda"][-100:]


@pytest.mark.parametrize("asked", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
def test_a_range_beyond_the_disk_is_416(server: WebServer, asked: str) -> None:
    status, headers, body = get(server, "/disks/vda.img", {"Range": asked})
    assert status == 416 and headers["content-range"] == f"bytes */{SIZE}" and body == b""


def test_if_range_of_another_version_gets_the_whole(server: WebServer, disks: dict[str, bytes]) -> None:
    status, _, body = get(server, "/disks/vda.img", {"Range": "bytes=10-", "If-Range": '"other"'})
    assert status == 200 and body == disks["vda"]


def test_head_gives_the_size_and_no_body(server: WebServer) -> None:
    status, headers, body = get(server, "/disks/vda.img", method="HEAD")
    assert status == 200 and headers["content-length"] == str(SIZE) and body == b""


def test_the_vhd_is_the_disk_and_a_footer(server: WebServer, disks: dict[str, bytes]) -> None:
    status, headers, body = get(server, "/disks/vda.vhd")
    assert status == 200 and int(headers["content-length"]) == SIZE + 512
    assert body[:SIZE] == disks["vda"]
    footer = body[SIZE:]
    assert footer[:8] == b"conectix" and int.from_bytes(footer[48:56], "big") == SIZE
    assert int.from_bytes(footer[60:64], "big") == 2  # fixed
    assert int.from_bytes(footer[64:68], "big") == vhd.checksum(footer)


def test_a_vhd_range_across_the_footer_boundary(server: WebServer) -> None:
    whole = get(server, "/disks/vda.vhd")[2]
    status, headers, part = get(server, "/disks/vda.vhd", {"Range": f"bytes={SIZE - 100}-{SIZE + 99}"})
    assert status == 206 and part == whole[SIZE - 100 : SIZE + 100]
    assert headers["content-range"] == f"bytes {SIZE - 100}-{SIZE + 99}/{SIZE + 512}"
    assert get(server, "/disks/vda.vhd", {"Range": f"bytes={SIZE + 500}-"})[2] == whole[SIZE + 500 :]


def test_the_sha256_is_computed_on_request(server: WebServer, disks: dict[str, bytes]) -> None:
    status, _, body = get(server, "/disks/vda.sha256")
    deadline = time.monotonic() + 10
    while status == 202 and time.monotonic() < deadline:
        assert b"computing the sha256 of vda" in body
        time.sleep(0.05)
        status, _, body = get(server, "/disks/vda.sha256")
    assert status == 200 and body.decode() == f"{hashlib.sha256(disks['vda']).hexdigest()}  vda.img\n"
    assert hashlib.sha256(disks["vda"]).hexdigest() in get(server, "/")[2].decode()


def test_the_sha256_is_computed_again_after_a_write(server: WebServer, tmp_path: Path) -> None:
    def digest() -> bytes:
        deadline = time.monotonic() + 10
        while (reply := get(server, "/disks/vdb.sha256"))[0] == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
        return reply[2]

    before = digest()
    changed = disk_file(tmp_path / "vdb.raw", b"changed")
    os.utime(tmp_path / "vdb.raw", ns=(time.time_ns(), time.time_ns() + 10**9))
    after = digest()
    assert before != after and after.decode().startswith(hashlib.sha256(changed).hexdigest())


@pytest.mark.parametrize("path", ["/disks/sda.img", "/disks/..%2F..%2Fetc%2Fpasswd.img", "/disks/../vda.raw",
                                  "/etc/passwd", "/disks/vda.raw", "/storagetm.pyz"])  # fmt: skip
def test_nothing_but_the_exports_is_served(server: WebServer, path: str) -> None:
    assert get(server, path)[0] == 404


def test_the_helper_is_served_when_present(server: WebServer, tmp_path: Path) -> None:
    (tmp_path / "storagetm.pyz").write_bytes(b"PK helper")
    assert get(server, "/storagetm.pyz")[:3:2] == (200, b"PK helper")
    assert 'href="/storagetm.pyz"' in get(server, "/")[2].decode()


def test_a_snapshot_export_is_read_from_the_device_the_initiator_sees(
    server: WebServer, state: RunState, tmp_path: Path
) -> None:
    seen = disk_file(tmp_path / "snapshot-view.raw", b"with the initiator's writes")
    nqn = next(iter(sorted(state.exports)))
    export = state.exports[nqn]
    state.exports[nqn] = Export(export.disk, export.identity, Mode.SNAPSHOT)
    state.backings[nqn] = Backing(str(tmp_path / "snapshot-view.raw"), "storagetm-x")
    assert get(server, "/disks/vda.img")[2] == seen


def test_web_token_is_empty_without_auth_or_tls_and_distinct_with() -> None:
    assert web_token(AuthConfig(), TLSConfig()) == ""
    auth = AuthConfig("DHHC-1:00:abc:", "", ("nqn.h",))
    assert len(web_token(auth, TLSConfig())) == 16
    assert web_token(auth, TLSConfig()) == web_token(auth, TLSConfig())
    assert web_token(auth, TLSConfig()) != web_token(AuthConfig(), TLSConfig("NVMeTLSkey-1:01:x:", ("h",)))


@pytest.fixture
def locked(state: RunState) -> str:
    token = web_token(AuthConfig("DHHC-1:00:abc:", "", ("nqn.h",)), TLSConfig())
    state.web = WebConfig(80, token)
    return token


@pytest.mark.parametrize("path", ["/", "/status.json", "/disks/vda.img", "/disks/vda.vhd", "/disks/vda.sha256"])
def test_with_a_token_everything_is_refused_without_it(server: WebServer, locked: str, path: str) -> None:
    status, _, body = get(server, path)
    assert status == 403 and b"screen" in body and b"vda" not in body
    assert get(server, path, {"Cookie": f"{COOKIE}=wrongwrongwrong1"})[0] == 403
    assert get(server, path + "?token=wrongwrongwrong1")[0] == 403


def test_the_token_sets_a_cookie_and_leaves_the_address(server: WebServer, locked: str) -> None:
    status, headers, _ = get(server, f"/disks/vda.img?token={locked}")
    assert status == 303 and headers["location"] == "/disks/vda.img"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={locked};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, body = get(server, "/disks/vda.img", {"Cookie": cookie.split(";")[0]})
    assert status == 200 and len(body) == SIZE
    assert get(server, "/", {"Cookie": cookie.split(";")[0]})[0] == 200
    assert get(server, f"//elsewhere.example/?token={locked}&x=1")[1]["location"] == "/elsewhere.example/?x=1"


def test_no_token_in_the_logs(server: WebServer, locked: str, logged: list[log.Record]) -> None:
    get(server, f"/?token={locked}")
    get(server, "/?token=wrongwrongwrong1")
    get(server, "/", {"Cookie": f"{COOKIE}={locked}"})
    server.stop()  # the request lines are logged after the response: wait for the threads
    text = "\n".join(record.message for record in logged)
    assert "GET /?token=" in text and locked not in text and "wrongwrongwrong1" not in text


def test_connections_beyond_the_limit_are_turned_away(state: RunState, tmp_path: Path) -> None:
    import socket

    web = WebServer(lambda: state, 0, host="127.0.0.1", helper=tmp_path / "none", max_connections=2, poll=0.02)
    web.start()
    try:
        idle = [socket.create_connection(web.address) for _ in range(2)]
        time.sleep(0.2)
        status, _, _ = get(web, "/")
        assert status == 503
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert get(web, "/")[0] == 200
    finally:
        web.stop()


def test_stop_closes_a_download_in_progress(state: RunState, tmp_path: Path) -> None:
    import socket

    web = WebServer(lambda: state, 0, host="127.0.0.1", helper=tmp_path / "none", poll=0.02)
    web.start()
    sock = socket.create_connection(web.address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /disks/vda.img HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(100)
    started = time.monotonic()
    web.stop()
    assert time.monotonic() - started < 5 and not web.httpd
    sock.close()


def test_release_ends_only_the_downloads_of_a_withdrawn_disk(tmp_path: Path) -> None:
    import socket

    exports = []
    for name in ("vda", "vdb"):  # larger than what the sockets' buffers hold
        (tmp_path / f"{name}.raw").write_bytes(b"")
        os.truncate(tmp_path / f"{name}.raw", 256 << 20)
        exports.append(export_of(tmp_path / f"{name}.raw", name))
    state = RunState(exports={e.nqn: e for e in exports})
    web = WebServer(lambda: state, 0, host="127.0.0.1", helper=tmp_path / "none", poll=0.02)
    web.start()
    try:
        socks = {}
        for name in ("vda", "vdb"):
            sock = socket.create_connection(web.address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /disks/{name}.img HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(100)
            socks[name] = sock
        assert web.httpd is not None
        time.sleep(0.1)
        assert sorted(web.httpd.reading.values()) == [str(tmp_path / "vda.raw"), str(tmp_path / "vdb.raw")]
        web.release({str(tmp_path / "vda.raw")})
        assert list(web.httpd.reading.values()) == [str(tmp_path / "vdb.raw")]
        for sock in socks.values():
            sock.close()
    finally:
        web.stop()


def test_with_tls_on_the_page_shows_the_disks_but_offers_no_download(server: WebServer, state: RunState) -> None:
    from storagetm.web.links import screen_lines

    state.web = WebConfig(80, downloads=False)
    for path in ("/disks/vda.img", "/disks/vda.vhd", "/disks/vda.sha256", "/disks/nothing.img"):
        status, _, body = get(server, path)
        assert (status, body.decode()) == (403, "TLS is on: disks are not offered over plain HTTP; boot with "
                                                "storagetm.web=downloads (or --web-downloads) to allow it\n")
    status, _, body = get(server, "/")
    page = body.decode()
    assert status == 200 and "<b>vda</b>" in page and "/disks/" not in page and "storagetm.web=downloads" in page
    state.addresses = [Address("ipv4", "169.254.1.2", "enp0s3", True)]
    assert screen_lines(state) == ["Web page (any browser, no downloads: TLS): http://169.254.1.2/"]
    state.web = WebConfig(80, downloads=True)
    assert get(server, "/disks/vda.img")[0] == 200 and "/disks/vda.img" in get(server, "/")[2].decode()


def test_a_disk_being_released_is_not_opened_until_resumed(server: WebServer, tmp_path: Path) -> None:
    vda = {str(tmp_path / "vda.raw")}
    server.release(vda)
    for path in ("/disks/vda.img", "/disks/vda.vhd", "/disks/vda.sha256"):
        status, _, body = get(server, path)
        assert (status, body) == (503, b"disk is changing, retry in a moment\n")
    assert server.hashes.jobs == {} and server.readers.get(str(tmp_path / "vda.raw"), 0) == 0
    assert get(server, "/")[0] == 200 and get(server, "/disks/vdb.img")[0] == 200
    server.resume(vda)
    assert get(server, "/disks/vda.img")[0] == 200


def test_the_screen_shows_the_address_with_the_token_only_where_secrets_are_shown() -> None:
    from storagetm.console.screen import render
    from storagetm.system.network import Address
    from storagetm.web.links import urls

    state = RunState(addresses=[Address("ipv4", "169.254.1.2", "enp0s3", True)], announced="stm-ab12.local",
                     web=WebConfig(80, "Tok3nTok3nTok3nX"),
                     auth=AuthConfig("DHHC-1:00:x:", "", ("nqn.h",)))  # fmt: skip
    assert urls(state) == ["http://169.254.1.2/?token=Tok3nTok3nTok3nX", "http://stm-ab12.local/?token=Tok3nTok3nTok3nX"]
    screen = render(state, dashboard=True)
    assert "Web page (any browser): http://169.254.1.2/?token=Tok3nTok3nTok3nX" in screen
    assert "Tok3nTok3nTok3nX" not in render(state.without_secrets())
    assert "Tok3nTok3nTok3nX" not in json.dumps(state.without_secrets().to_json())
    assert urls(RunState(addresses=state.addresses, web=WebConfig(8080))) == ["http://169.254.1.2:8080/"]
    assert urls(RunState(addresses=state.addresses)) == []  # not serving


def test_the_page_refreshes_itself_and_shows_no_secret(server: WebServer, state: RunState) -> None:
    from storagetm.model import IscsiConfig
    from storagetm.system.network import Address

    state.auth = AuthConfig("DHHC-1:00:c2VjcmV0:", "DHHC-1:00:Y3RybA==:", ("nqn.host",))
    state.iscsi = IscsiConfig(True, "iqn.2023-10.io.systemd.storagetm:x", "chapsecret123456", "chaptarget123456")
    state.addresses = [Address("ipv4", "169.254.1.2", "enp0s3", True)]
    token = web_token(state.auth, state.tls)
    state.web = WebConfig(80, token)
    page = get(server, "/", {"Cookie": f"{COOKIE}={token}"})[2].decode()
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "Quick Connect" in page and "nvme connect-all -t tcp -a 169.254.1.2" in page
    for secret in ("DHHC-1:00:c2VjcmV0:", "DHHC-1:00:Y3RybA==:", "chapsecret123456", "chaptarget123456", token):
        assert secret not in page


def test_downloads_go_by_sendfile(server: WebServer, disks: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        done = real(out_fd, in_fd, offset, count)
        sent.append(done)
        return done

    monkeypatch.setattr(os, "sendfile", counting)
    assert get(server, "/disks/vda.img")[2] == disks["vda"]
    assert sum(sent) == SIZE


def test_a_source_whose_fstat_says_0_bytes_is_sent_whole(
    server: WebServer, disks: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block device's st_size is 0: its size comes from seeking to its end, and every byte
    still goes (socket.sendfile() would send none)."""
    real = os.fstat

    def as_a_block_device(fd: int) -> os.stat_result:
        result = real(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".raw"):
            fields = list(result)
            fields[6] = 0  # st_size
            return os.stat_result(fields)
        return result

    monkeypatch.setattr(os, "fstat", as_a_block_device)
    status, headers, body = get(server, "/disks/vdb.img", {"Range": "bytes=100-"})
    assert status == 206 and body == disks["vdb"][100:]
    assert get(server, "/disks/vdb.vhd")[2][:SIZE] == disks["vdb"]


def test_state_round_trips_the_web_page_and_hash_progress(state: RunState) -> None:
    first, second = sorted(state.exports)
    state.web = WebConfig(8080, "Tok3nTok3nTok3nX")
    state.hashing = {first: HashProgress(1 << 20, SIZE), second: HashProgress(SIZE, SIZE, "ab" * 32)}
    back = RunState.from_json(json.loads(json.dumps(state.to_json())))
    assert back.web == state.web and back.hashing == state.hashing
    assert state.to_json()["exports"][1]["sha256"]["digest"] == "ab" * 32  # status.json, with its disk
    assert state.without_secrets().to_json()["web"]["token"] == "(hidden)"


def test_hash_status_running_then_done_and_gone_once_the_disk_changes(
    server: WebServer, state: RunState, disks: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the screen shows: the bytes done while it runs, the digest once done, and no digest
    once the disk was written to (it is of what the disk was)."""
    import storagetm.web.hashing as hashing

    gate = __import__("threading").Event()
    real = os.pread

    def slow(fd: int, n: int, offset: int) -> bytes:
        if offset > 0:
            gate.wait(10)
        return real(fd, n, offset)

    monkeypatch.setattr(hashing, "CHUNK", 1 << 20)
    monkeypatch.setattr(os, "pread", slow)
    nqn = next(nqn for nqn, e in state.exports.items() if e.disk.name == "vda")
    assert server.hash_status(state) == {}  # nothing asked for yet
    status, _, body = get(server, "/disks/vda.sha256")
    time.sleep(0.2)
    assert status == 202 and server.hash_status(state) == {nqn: HashProgress(1 << 20, SIZE)}
    assert server.hash_status(state)[nqn].fraction == pytest.approx(1 / 3)
    assert "33%" in get(server, "/")[2].decode()
    gate.set()
    deadline = time.monotonic() + 10
    while (status := get(server, "/disks/vda.sha256")[0]) == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    digest = hashlib.sha256(disks["vda"]).hexdigest()
    assert status == 200 and server.hash_status(state) == {nqn: HashProgress(SIZE, SIZE, digest)}
    with (tmp_path / "vda.raw").open("r+b") as disk:  # written to: a file's mtime says so
        disk.write(b"changed")
    os.utime(tmp_path / "vda.raw", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert server.hash_status(state) == {}


def test_the_web_options() -> None:
    import argparse

    from storagetm.config import options
    from storagetm.config.settings import Settings

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    assert options.settings_of(parser.parse_args([])).web is True
    given = options.settings_of(parser.parse_args(["--no-web", "--web-port=8080"]))
    assert (given.web, given.web_port) == (False, 8080)
    booted, problems = options.apply_kernel_cmdline(Settings(), "storagetm.web=0 storagetm.web_port=81")
    assert (booted.web, booted.web_port, problems) == (False, 81, [])
    bad, problems = options.apply_kernel_cmdline(Settings(), "storagetm.web=maybe")
    assert bad.web is False and "not serving the web page" in problems[0] and not bad.refusals
    assert Settings().web_port == 80
