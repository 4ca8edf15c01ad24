from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec.structs
import pytest

from storagetm import state
from storagetm.backing.layer import BackingLayer
from storagetm.config.settings import Settings
from storagetm.console.screen import Screen
from storagetm.daemon import Daemon, serve_at_realtime_priority
from storagetm.disks.disk import Disk
from storagetm.disks.policy import SystemFacts
from storagetm.disks.udev import DiskEvent
from storagetm.fabrics.nvmet.configfs import Root
from storagetm.model import Backing, Listener
from storagetm.reconcile.journal import Journal
from storagetm.state import RunState
from storagetm.system import log
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.fake_machine import FakeKeyring, FakeMachine

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"


class RecordingScreen(Screen):
    def __init__(self) -> None:
        super().__init__(terminal=False)
        self.shown: list[int] = []

    def show(self, state: RunState, io_port: int = 4420) -> None:
        self.shown.append(len(state.exports))


class QueuedEvents:
    def __init__(self, events: list[DiskEvent]) -> None:
        self.queue = events

    def events(self) -> Iterator[DiskEvent]:
        while self.queue:
            yield self.queue.pop(0)


def attached(tmp_path: Path, settings: Settings, fake: FakeConfigfs, screen: Screen | None = None,
             machine: FakeMachine | None = None, **kw: Any) -> Daemon:  # fmt: skip
    """A daemon on the fake configfs and a fake machine, its reconciler attached as run() does."""
    backing = BackingLayer((machine or FakeMachine(tmp_path)).system())
    daemon = Daemon(settings, screen=screen or RecordingScreen(), root=Root(fake.root, fake), facts=SystemFacts,
                    announcer=None, journal=Journal(tmp_path / "run" / "owned.jsonl"), backing=backing,
                    keyring=FakeKeyring(), **kw)  # fmt: skip
    assert daemon.root is not None
    daemon.attach(daemon.root)
    daemon.ipv6 = False
    daemon.state.nqn_base = BASE
    return daemon


def hot_disk(tmp_path: Path) -> Disk:
    image = tmp_path / "hot.img"
    image.write_bytes(b"\0" * (1 << 20))
    return Disk(name="hot.img", devnode=str(image), devnum=0, devtype="file", size=1 << 20, serial="HOT1")


def test_disk_event_exports_at_once_and_leaves_the_screen_for_later(tmp_path: Path) -> None:
    """The hotplug path links the new disk and returns; the redraw is the main loop's,
    a moment later (daemon.AFTER_DISK_EVENT)."""
    disk = hot_disk(tmp_path)
    fake = FakeConfigfs(tmp_path / "configfs")
    screen = RecordingScreen()
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), fake, screen)

    assert daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)])) is True  # type: ignore[arg-type]
    (nqn,) = daemon.state.exports
    assert [link for link in fake.links if link.endswith(nqn)] == [f"ports/4420/subsystems/{nqn}"]  # I/O port only
    assert daemon.state.ports == [Listener("ipv4", "0.0.0.0", 4420)]  # no address yet: no discovery port
    assert daemon.state.backings == {nqn: Backing(disk.devnode)}
    assert screen.shown == []
    assert daemon._on_disk_events(QueuedEvents([DiskEvent("change", disk)])) is False  # type: ignore[arg-type]
    assert daemon._on_disk_events(QueuedEvents([DiskEvent("remove", disk)])) is True  # type: ignore[arg-type]
    assert daemon.state.exports == {} and not (fake.root / "subsystems" / nqn).exists()
    assert daemon.reconciler is not None
    daemon.reconciler.teardown()
    assert sorted(os.listdir(fake.root / "ports")) == [] and os.listdir(fake.root / "subsystems") == []


def test_an_export_that_fails_is_a_problem_and_not_shown_as_exported(tmp_path: Path) -> None:
    disk = hot_disk(tmp_path)
    fake = FakeConfigfs(tmp_path / "configfs")
    fake.fail_on["enable"] = errno.EIO
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), fake)
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    assert daemon.state.exports == {} and daemon.state.backings == {}
    assert len(daemon.state.problems) == 1 and "Input/output error" in daemon.state.problems[0]
    assert len(daemon.state.ports) == 1  # the I/O port listens all the same (no address: no discovery port)
    del fake.fail_on["enable"]
    daemon.export_wanted()  # the next pass makes it
    assert len(daemon.state.exports) == 1 and daemon.state.problems == []


def test_a_restarted_daemon_keeps_the_exports_it_finds(tmp_path: Path) -> None:
    """A killed storagetm's exports are adopted from the ownership record: nothing is
    written again, nothing unlinked, so connected initiators see no change."""
    disk = hot_disk(tmp_path)
    fake = FakeConfigfs(tmp_path / "configfs")
    machine = FakeMachine(tmp_path)
    first = attached(tmp_path, Settings(devices=(disk.devnode,)), fake, machine=machine)
    first.disks = {disk.devnode: disk}
    first.export_wanted()
    assert len(first.state.exports) == 1
    fake.writes.clear()
    fake.links.clear()
    second = attached(tmp_path, Settings(devices=(disk.devnode,)), fake, machine=machine)
    assert second.reconciler is not None
    second.reconciler.recover()
    second.disks = {disk.devnode: disk}
    second.export_wanted()
    assert second.state.exports == first.state.exports
    assert fake.writes == [] and fake.links == []
    second.reconciler.teardown()
    assert os.listdir(fake.root / "subsystems") == [] and os.listdir(fake.root / "ports") == []


def test_status_goes_to_systemd_only_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen refreshes every second; systemd hears only a new status line, since each
    message wakes PID 1 on the same CPU as the next hotplug."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setattr(state, "save", lambda *_args, **_kwargs: "saved")
    daemon = Daemon(Settings(), screen=RecordingScreen(), facts=SystemFacts, announcer=None)

    def received() -> list[bytes]:
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(listener.recv(4096))
        return messages

    daemon.publish()
    daemon.publish()
    assert received() == [b"STATUS=Exporting 0 disks"]
    daemon.state.exports = {"nqn.x": None}  # type: ignore[dict-item]
    daemon.publish()
    daemon.publish()
    assert received() == [b"STATUS=Exporting 1 disk"]
    listener.close()


def test_realtime_refused_is_one_warning_and_the_daemon_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                                logged: list[log.Record]) -> None:  # fmt: skip
    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    serve_at_realtime_priority()
    assert [r.message for r in logged] == [
        "cannot raise storagetm to real-time priority: Operation not permitted; disk events wait their turn"
    ]


def test_failed_state_write_is_one_error_and_the_daemon_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                                logged: list[log.Record]) -> None:  # fmt: skip
    """/run full: the exports stay, the error is logged once until a write succeeds again."""
    results: list[OSError | None] = [OSError(28, "No space left on device", "/run/storagetm/.state.json.1")] * 3
    results.append(None)

    def save(*_args: object, **_kwargs: object) -> str:
        failure = results.pop(0)
        if failure is not None:
            raise failure
        return "saved"

    monkeypatch.setattr(state, "save", save)
    screen = RecordingScreen()
    daemon = Daemon(Settings(), screen=screen, facts=SystemFacts, announcer=None)
    for _ in range(4):
        daemon.publish()
    assert screen.shown == [0, 0, 0, 0] and daemon.saved_state == "saved"
    assert [(r.level_name, r.message) for r in logged if r.level >= log.INFO] == [
        ("ERROR", "cannot write the state file /run/storagetm/.state.json.1: No space left on device; the exports "
                  "go on, `storagetm status` shows old news until it can (free space in /run)"),
        ("INFO", "state file written again"),
    ]  # fmt: skip


def test_the_web_page_starts_with_the_token_and_stops_before_the_exports_go(tmp_path: Path) -> None:
    import http.client

    from msgspec.structs import replace

    from storagetm.security.auth import AuthConfig
    from storagetm.web.token import web_token

    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,), web_port=0), FakeConfigfs(tmp_path / "configfs"))
    daemon.state.auth = AuthConfig("DHHC-1:00:abc:", "", ("nqn.h",))
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    daemon.start_web(host="127.0.0.1")
    assert daemon.web is not None and daemon.state.web.token == web_token(daemon.state.auth, daemon.state.tls)
    port = daemon.state.web.port
    assert port == daemon.web.address[1] != 0

    def get(path: str, cookie: str = "") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        reply = conn.getresponse()
        result = reply.status, reply.read()
        conn.close()
        return result

    assert get("/")[0] == 403
    status, body = get("/", f"storagetm_token={daemon.state.web.token}")
    assert status == 200 and b'href="/disks/hot.img.img"' in body
    daemon.stop_web()
    assert daemon.state.web.port == 0
    with pytest.raises(OSError):
        get("/")
    # With a refused option nothing listens, the page neither.
    (tmp_path / "again").mkdir()
    refused = attached(tmp_path / "again", replace(Settings(web_port=0), refusals=("storagetm.x",)),
                       FakeConfigfs(tmp_path / "again" / "configfs"))  # fmt: skip
    refused.start_web(host="127.0.0.1")
    assert refused.web is None and refused.state.web.port == 0


def test_on_demand_the_web_port_is_taken_at_start_and_the_server_made_at_the_first_connection(tmp_path: Path) -> None:
    import http.client

    daemon = attached(tmp_path, Settings(web_port=0), FakeConfigfs(tmp_path / "configfs"))
    daemon.start_web(host="127.0.0.1", on_demand=True)
    assert daemon.web is None and daemon.web_socket is not None
    port = daemon.state.web.port
    assert port == daemon.web_socket.getsockname()[1] != 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")  # waits in the socket's queue: nothing serves it yet
        daemon.serve_web(daemon.web_socket)  # what the loop does when the socket turns readable
        assert daemon.web is not None and daemon.web_socket is None
        assert conn.getresponse().status == 200  # served (no authentication: no token asked)
    finally:
        conn.close()
        daemon.stop_web()
    assert daemon.state.web.port == 0
    with socket.socket() as again:  # the port is let go of
        again.bind(("127.0.0.1", port))


def test_a_web_socket_never_asked_for_is_closed_at_stop(tmp_path: Path) -> None:
    daemon = attached(tmp_path, Settings(web_port=0), FakeConfigfs(tmp_path / "configfs"))
    daemon.start_web(host="127.0.0.1", on_demand=True)
    listening = daemon.web_socket
    assert listening is not None
    daemon.stop_web()
    assert listening.fileno() == -1 and daemon.web_socket is None and daemon.state.web.port == 0


def test_a_web_port_in_use_costs_the_page_not_the_exports(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = attached(tmp_path, Settings(web_port=port), FakeConfigfs(tmp_path / "configfs"))
        daemon.start_web(host="127.0.0.1")
    assert daemon.web is None and daemon.state.web.port == 0
    assert any(f"cannot listen on TCP port {port}" in alert for alert in daemon.state.alerts)


def test_a_withdrawn_export_has_the_web_page_let_go_of_its_device_first(tmp_path: Path) -> None:
    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), FakeConfigfs(tmp_path / "configfs"))
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", disk)]))  # type: ignore[arg-type]
    released: list[tuple[set[str], set[str]]] = []
    resumed: list[tuple[set[str], list[int]]] = []
    applied: list[int] = []
    assert daemon.reconciler is not None
    apply = daemon.reconciler.apply

    def counted(*args: Any, **kwargs: Any) -> Any:
        applied.append(1)
        return apply(*args, **kwargs)

    daemon.reconciler.apply = counted  # type: ignore[method-assign]

    class Web:
        def release(self, paths: set[str]) -> None:
            released.append((paths, {e.disk.devnode for e in daemon.state.exports.values()}))

        def resume(self, paths: set[str]) -> None:
            resumed.append((paths, applied[:]))

    daemon.web = Web()  # type: ignore[assignment]
    daemon._on_disk_events(QueuedEvents([DiskEvent("remove", disk)]))  # type: ignore[arg-type]
    assert released[-1] == ({disk.devnode}, {disk.devnode})  # asked while the export was still there
    assert resumed == [({disk.devnode}, [1])]  # and given back once the reconciler is done
    assert daemon.state.exports == {}


@pytest.mark.parametrize("asked", ["generate", "DHHC-1:00:given:"])
def test_authentication_turned_on_again_keeps_it_bidirectional_as_asked_at_boot(tmp_path: Path, asked: str) -> None:
    daemon = attached(tmp_path, Settings(auth=True, dhchap_ctrl_secret=asked), FakeConfigfs(tmp_path / "configfs"))
    daemon.set_auth(False)
    assert daemon.state.auth.ctrl_secret == ""
    daemon.set_auth(True)
    on = daemon.state.auth
    assert on.enabled and on.secret.startswith("DHHC-1:") and on.ctrl_secret.startswith("DHHC-1:")
    assert on.ctrl_secret not in (on.secret, asked)


def test_authentication_turned_on_without_a_controller_secret_asked_is_one_way(tmp_path: Path) -> None:
    daemon = attached(tmp_path, Settings(), FakeConfigfs(tmp_path / "configfs"))
    daemon.set_auth(True)
    assert daemon.state.auth.enabled and daemon.state.auth.ctrl_secret == ""


def test_with_tls_on_the_web_page_offers_downloads_only_when_asked(tmp_path: Path) -> None:
    from storagetm.security.tls import TLSConfig, generate_key

    for asked, offered in ((False, False), (True, True)):
        (tmp_path / str(asked)).mkdir()
        daemon = attached(tmp_path / str(asked), Settings(web_port=0, web_downloads=asked),
                          FakeConfigfs(tmp_path / str(asked) / "configfs"))  # fmt: skip
        daemon.state.tls = TLSConfig(generate_key(), ("nqn.h",))
        daemon.start_web(host="127.0.0.1")
        try:
            assert daemon.state.web.port and daemon.state.web.downloads is offered
        finally:
            daemon.stop_web()
    daemon = attached(tmp_path, Settings(web_port=0), FakeConfigfs(tmp_path / "configfs"))
    daemon.start_web(host="127.0.0.1")
    assert daemon.state.web.downloads
    daemon.stop_web()


def test_udevs_names_arriving_after_the_export_do_not_pause_its_downloads(tmp_path: Path) -> None:
    """A disk exported from the kernel's event is refined by udev's (by-id names, a label):
    its device stays as it is, so a download from the web page goes on."""
    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), FakeConfigfs(tmp_path / "configfs"))
    early = msgspec.structs.replace(disk, by_id=(), names_pending=True)
    daemon._on_disk_events(QueuedEvents([DiskEvent("add", early)]))  # type: ignore[arg-type]
    released: list[set[str]] = []

    class Web:
        def release(self, paths: set[str]) -> None:
            released.append(paths)

        def resume(self, paths: set[str]) -> None:
            pass

    daemon.web = Web()  # type: ignore[assignment]
    refined = msgspec.structs.replace(disk, by_id=("/dev/disk/by-id/virtio-HOT1",))
    daemon._on_disk_events(QueuedEvents([DiskEvent("change", refined)]))  # type: ignore[arg-type]
    assert [e.disk.by_id for e in daemon.state.exports.values()] == [refined.by_id]
    assert released and not any(released), released
    daemon._on_disk_events(QueuedEvents([DiskEvent("remove", refined)]))  # type: ignore[arg-type]
    assert released[-1] == {disk.devnode}
