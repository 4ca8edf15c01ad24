"""The daemon's own loop while nothing changes: it samples, but neither redraws nor writes
the state file, forks no `dmsetup` for an unwritten snapshot, and without a dashboard it
samples less often. Wakeups are counted on the real loop with fakes around it."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storagetm import daemon as daemon_module
from storagetm.backing import modes
from storagetm.backing.modes import SnapshotUsage
from storagetm.config.settings import Settings
from storagetm.console import stats
from storagetm.console.stats import DiskActivity
from storagetm.daemon import Daemon
from storagetm.disks.udev import DiskEvent
from storagetm.model import Backing
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import attached, hot_disk

IDLE = DiskActivity(read_bytes=4096, written_bytes=0, read_rate=0.0, write_rate=0.0, read_fraction=0.0)


class NoEvents:
    """A udev monitor nothing happens on: a pipe that is never readable."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def events(self) -> Iterator[DiskEvent]:
        return iter(())

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def exporting(tmp_path: Path) -> Daemon:
    disk = hot_disk(tmp_path)
    daemon = attached(tmp_path, Settings(devices=(disk.devnode,)), FakeConfigfs(tmp_path / "configfs"))
    daemon.disks = {disk.devnode: disk}
    daemon.export_wanted()
    assert len(daemon.state.exports) == 1
    return daemon


def run_loop_for(daemon: Daemon, seconds: float) -> None:
    devices, (addr, addr_peer) = NoEvents(), socket.socketpair()
    wake_r, wake_w = os.pipe()

    def stop() -> None:
        daemon.stop_requested = True
        os.write(wake_w, b"x")

    timer = threading.Timer(seconds, stop)
    timer.start()
    try:
        daemon._loop(devices, addr, wake_r)  # type: ignore[arg-type]
    finally:
        timer.cancel()
        devices.close()
        addr.close()
        addr_peer.close()
        os.close(wake_r)
        os.close(wake_w)


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, dict[str, int]]]:
    monkeypatch.setattr(daemon_module, "udev_settled", lambda: True)
    monkeypatch.setattr(daemon_module, "DASHBOARD_REFRESH", 0.02)
    monkeypatch.setattr(daemon_module, "IDLE_REFRESH", 0.1)
    monkeypatch.setattr(daemon_module, "INITIATOR_POLL", 0.05)
    daemon = exporting(tmp_path)
    counts = {"samples": 0, "publishes": 0}
    sample, publish = daemon.sample_activity, daemon.publish

    def counted_sample() -> bool:
        counts["samples"] += 1
        return sample()

    def counted_publish() -> None:
        counts["publishes"] += 1
        publish()

    monkeypatch.setattr(daemon, "sample_activity", counted_sample)
    monkeypatch.setattr(daemon, "publish", counted_publish)
    yield daemon, counts


def test_an_idle_target_without_a_dashboard_samples_seldom_and_publishes_nothing(
    counted: tuple[Daemon, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, counts = counted
    monkeypatch.setattr(stats, "initiators", lambda ports: [])
    run_loop_for(daemon, 1.0)
    assert 5 <= counts["samples"] <= 11  # every IDLE_REFRESH (0.1 s), not every DASHBOARD_REFRESH (0.02 s)
    assert counts["publishes"] == 0


def test_a_connected_initiator_brings_the_second_by_second_samples_back(
    counted: tuple[Daemon, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, counts = counted
    seen = iter([["192.0.2.7"]] * 3 + [[]] * 1000)  # connected for three samples, then gone
    monkeypatch.setattr(stats, "initiators", lambda ports: next(seen))
    run_loop_for(daemon, 1.0)
    assert counts["publishes"] == 2  # it came, it went: two redraws, nothing in between
    assert counts["samples"] >= 6


def test_the_samples_are_a_second_apart_while_anything_moves_or_a_dashboard_shows(tmp_path: Path) -> None:
    daemon = exporting(tmp_path)
    assert daemon.refresh_interval() == daemon_module.IDLE_REFRESH
    daemon.moving = True
    assert daemon.refresh_interval() == daemon_module.DASHBOARD_REFRESH
    daemon.moving, daemon.screen.terminal = False, True
    assert daemon.refresh_interval() == daemon_module.DASHBOARD_REFRESH


def test_with_a_dashboard_it_samples_every_second_and_redraws_only_what_changed(
    counted: tuple[Daemon, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, counts = counted
    daemon.screen.terminal = True
    monkeypatch.setattr(stats, "initiators", lambda ports: [])
    run_loop_for(daemon, 0.5)
    assert counts["samples"] >= 8 and counts["publishes"] == 0  # 0.02 s apart: 25 if the machine keeps up


def exporting_a_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Daemon, str, list[str]]:
    """A daemon exporting one disk in snapshot mode; the list records each `dmsetup status`
    (its answer: as many bytes used as there were calls, of 100 MiB)."""
    daemon = exporting(tmp_path)
    (nqn,) = daemon.state.exports
    daemon.state.backings = {nqn: Backing("/dev/mapper/snap", "snap", "/run/storagetm/store")}
    calls: list[str] = []

    def usage(name: str) -> SnapshotUsage:
        calls.append(name)
        return SnapshotUsage(used=len(calls), total=100 << 20, invalid=False)

    monkeypatch.setattr(modes, "snapshot_usage", usage)
    return daemon, nqn, calls


def test_dmsetup_runs_for_a_snapshot_only_when_it_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, nqn, calls = exporting_a_snapshot(tmp_path, monkeypatch)
    monkeypatch.setattr(stats, "initiators", lambda ports: [])
    activity = {nqn: IDLE}
    monkeypatch.setattr(daemon.meter, "sample", lambda exported: dict(activity))
    assert daemon.sample_activity() is True  # the first sample: activity and the store's fill
    assert daemon.sample_activity() is False and daemon.sample_activity() is False
    assert calls == ["snap"]
    activity[nqn] = DiskActivity(4096, 8192, 0.0, 8192.0, 0.0)
    assert daemon.sample_activity() is True and calls == ["snap", "snap"]
    assert daemon.state.snapshot_usage[nqn].used == 2


def test_a_new_snapshot_is_drawn_with_its_fill_from_its_first_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, nqn, calls = exporting_a_snapshot(tmp_path, monkeypatch)
    daemon.publish()  # no sample yet: what the export's first draw shows
    assert calls == ["snap"] and daemon.state.snapshot_usage[nqn].total == 100 << 20
    daemon.publish()
    assert calls == ["snap"]  # known since: no second fork
    daemon.state.backings = {}
    daemon.publish()
    assert daemon.state.snapshot_usage == {}


def test_the_loop_makes_the_web_server_at_the_first_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import http.client

    monkeypatch.setattr(daemon_module, "udev_settled", lambda: True)
    daemon = exporting(tmp_path)
    daemon.settings = Settings(devices=daemon.settings.devices, web_port=0)
    daemon.start_web(host="127.0.0.1", on_demand=True)
    assert daemon.web is None and daemon.web_socket is not None
    port, replies = daemon.state.web.port, []

    def ask() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/status.json")
            reply = conn.getresponse()
            replies.append((reply.status, reply.read()))
        finally:
            conn.close()

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        run_loop_for(daemon, 3.0)
        asker.join(10)
        assert daemon.web is not None and daemon.web_socket is None
        assert replies and replies[0][0] == 200 and b'"exports"' in replies[0][1]
    finally:
        daemon.stop_web()


def test_starting_the_daemon_imports_no_web_server() -> None:
    """The page's server and its imports come with the first connection (see the test above)."""
    import subprocess
    import sys

    code = "import sys, storagetm.cli, storagetm.daemon; print(sorted(m for m in ('http.server', 'http.client', 'ssl', 'email', 'storagetm.web.server') if m in sys.modules))"  # noqa: E501
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_web_server_that_fails_at_the_first_connection_is_said_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storagetm.web.server import WebServer

    def broken(self: WebServer, listening: socket.socket | None = None) -> None:
        raise RuntimeError("cannot start new thread")

    monkeypatch.setattr(daemon_module, "udev_settled", lambda: True)
    monkeypatch.setattr(WebServer, "start", broken)
    daemon = exporting(tmp_path)
    daemon.settings = Settings(devices=daemon.settings.devices, web_port=0)
    daemon.start_web(host="127.0.0.1", on_demand=True)
    published: list[list[str]] = []
    publish = daemon.publish

    def recorded() -> None:
        published.append(list(daemon.state.alerts))
        publish()

    monkeypatch.setattr(daemon, "publish", recorded)
    with socket.create_connection(("127.0.0.1", daemon.state.web.port), timeout=5):
        run_loop_for(daemon, 1.0)  # no dashboard: without its own publish the next would be seconds away
    line = "no web page: its server did not start: cannot start new thread"
    assert published and line in published[0] and daemon.web is None and daemon.state.web.port == 0
    assert len(daemon.state.exports) == 1  # the page went, the export stayed


def test_connections_are_read_when_a_disk_moved_else_every_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = exporting(tmp_path)
    (nqn,) = daemon.state.exports
    reads: list[set[int]] = []

    def initiators(ports: set[int]) -> list[str]:
        reads.append(ports)
        return ["fe80::1"]

    monkeypatch.setattr(stats, "initiators", initiators)
    activity = {nqn: IDLE}
    monkeypatch.setattr(daemon.meter, "sample", lambda exported: dict(activity))
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    daemon.sample_activity()
    assert len(reads) == 1 and daemon.state.initiators == ["fe80::1"]
    for _ in range(2):  # idle: the connections are not read again within INITIATOR_POLL
        now[0] += 1.0
        daemon.sample_activity()
    assert len(reads) == 1
    activity[nqn] = DiskActivity(8192, 0, 4096.0, 0.0, 0.0)  # a disk moved: read at once
    now[0] += 0.5
    daemon.sample_activity()
    assert len(reads) == 2
    activity[nqn] = IDLE
    now[0] += daemon_module.INITIATOR_POLL
    daemon.sample_activity()
    assert len(reads) == 3 and daemon.moving  # an initiator is connected: the next sample a second away
