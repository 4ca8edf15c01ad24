"""The control socket: `storagetm FILE…` hands its files to a running daemon (both ends real:
the client in its own process, the daemon on the fake configfs)."""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storagetm import cli, control
from storagetm.config.settings import Settings
from storagetm.control import ControlServer, decode, encode, handover_specs
from storagetm.daemon import Daemon
from storagetm.disks.disk import Disk, disk_from_file
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import attached

REPO = Path(__file__).resolve().parents[2]
# The command as the image runs it, on the test's socket; at its end it names what it imported.
CLIENT = """
import sys
from storagetm import cli, control
control.CONTROL_SOCKET = sys.argv[1]
code = cli.main(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.startswith("storagetm") or m in ("argparse", "logging", "json", "typing"))
print("loaded:", " ".join(loaded), file=sys.stderr)
sys.exit(code)
"""
MiB = 1 << 20


class Served:
    """A daemon on the fake configfs, listening on a control socket in the test's directory."""

    def __init__(self, daemon: Daemon, fake: FakeConfigfs, path: str, server: ControlServer) -> None:
        self.daemon, self.fake, self.path, self.server = daemon, fake, path, server
        self.selector = selectors.DefaultSelector()
        server.start(self.selector)

    def subsystems(self) -> list[str]:
        """The disks' subsystems (not the one that keeps the discovery port listening)."""
        return sorted(n for n in os.listdir(self.fake.root / "subsystems") if not n.endswith(":discovery-port"))

    def pump(self, until: Callable[[], bool], timeout: float = 30.0) -> None:
        """Run the daemon's side of the socket until `until()` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            for key, _ in self.selector.select(0.05):
                self.server.ready(key.fd, self.daemon)

    def client(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", CLIENT, self.path, *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def finished(self, proc: subprocess.Popen[str]) -> tuple[int, str, str]:
        self.pump(lambda: proc.poll() is not None)
        out, err = proc.communicate()
        return proc.returncode, out, err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    fake = FakeConfigfs(tmp_path / "configfs")
    daemon = attached(tmp_path, Settings(all_disks=True), fake)  # as the image's service: --all
    path = str(tmp_path / "run" / "control")
    server = ControlServer(path)
    yield Served(daemon, fake, path, server)
    server.close()


def image(tmp_path: Path, name: str, size: int = MiB) -> str:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return str(path)


def test_messages_keep_every_byte_of_a_path() -> None:
    odd = os.fsdecode(b"/var/tmp/\xff\n x.img")
    assert decode(encode("export", [odd, "sdb"])) == ("export", [odd, "sdb"])
    assert decode(encode("withdraw")) == ("withdraw", [])


def test_only_plain_disk_arguments_are_handed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYSTEMD_NVME_UUID", raising=False)
    (tmp_path / "here.img").write_bytes(b"\0" * 512)
    assert handover_specs(["here.img", "./y.img", "sdb", "SERIAL1"], ["status"]) == [
        f"{tmp_path}/here.img", f"{tmp_path}/y.img", "sdb", "SERIAL1"]  # a file here: the daemon is elsewhere
    assert handover_specs(["a/b.img"], []) == [f"{tmp_path}/a/b.img"]
    assert handover_specs([], []) is None
    assert handover_specs(["status"], ["status"]) is None
    assert handover_specs(["x.img", "--read-only"], []) is None  # options: the engine's own path
    assert handover_specs(["--all"], []) is None
    monkeypatch.setenv("SYSTEMD_NVME_UUID", "0c6b1f3e-6a3c-4a43-9d4e-0e8a3f4b6c11")
    assert handover_specs(["x.img"], []) is None  # an identity of its own: the engine's path


def test_a_handed_over_file_is_exported_by_the_daemon_until_the_client_ends(served: Served, tmp_path: Path) -> None:
    path = image(tmp_path, "x.img")
    proc = served.client(path)
    served.pump(lambda: bool(served.daemon.handed))
    (nqn,) = served.daemon.state.exports
    assert served.subsystems() == [nqn] and served.daemon.state.exports[nqn].disk.devnode == path
    assert os.stat(served.path).st_mode & 0o777 == 0o600
    assert proc.stdout is not None
    assert select.select([proc.stdout], [], [], 30)[0]  # the screen is out: the client waits
    proc.send_signal(signal.SIGTERM)
    code, out, err = served.finished(proc)
    assert code == 0, err
    assert "Exported disks (1):" in out and nqn in out and out.rstrip().endswith("exports withdrawn, disks flushed.")
    assert f"storagetm: exported {path} (read-write) as {nqn}\n" in err
    assert f"storagetm: withdrew {nqn} ({path})\n" in err
    loaded = err.split("loaded: ")[-1].split()
    assert loaded == ["storagetm", "storagetm.cli", "storagetm.control"]  # no engine, no argparse, logging, json
    assert served.subsystems() == [] and served.daemon.handed == {} and served.daemon.disks == {}


def test_a_second_request_on_one_connection_ends_it_and_withdraws_the_first(served: Served, tmp_path: Path) -> None:
    first, second = image(tmp_path, "first.img"), image(tmp_path, "second.img")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(served.path)
    served.pump(lambda: bool(served.server.clients))
    assert decode(client.recv(4096)) == ("ready", [])
    client.sendall(encode("export", [first]))
    served.pump(lambda: bool(served.daemon.handed))
    assert decode(client.recv(1 << 20))[0] == "exported" and len(served.subsystems()) == 1
    client.sendall(encode("export", [second]))
    served.pump(lambda: not served.server.clients)
    assert client.recv(4096) == b"" and served.subsystems() == [] and served.daemon.disks == {}
    client.close()


def test_the_client_says_so_when_the_daemon_stops_under_it(served: Served, tmp_path: Path) -> None:
    proc = served.client(image(tmp_path, "x.img"))
    served.pump(lambda: bool(served.daemon.handed))
    assert proc.stdout is not None and select.select([proc.stdout], [], [], 30)[0]
    served.server.close()  # as the daemon's teardown does, before it withdraws everything
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "storagetm: the running storagetm stopped; its exports, these too, are withdrawn" in err


def test_a_killed_client_has_its_files_withdrawn(served: Served, tmp_path: Path) -> None:
    files = [image(tmp_path, f"f{i}.img") for i in range(3)]
    proc = served.client(*files)
    served.pump(lambda: bool(served.daemon.handed))
    assert len(served.subsystems()) == 3
    proc.kill()
    proc.wait()
    served.pump(lambda: not served.daemon.handed)
    assert served.subsystems() == [] and served.daemon.state.exports == {} and served.daemon.disks == {}
    proc.communicate()


def test_a_bad_file_fails_the_whole_request_and_nothing_is_exported(served: Served, tmp_path: Path) -> None:
    good, empty = image(tmp_path, "good.img"), image(tmp_path, "empty.img", 0)
    code, out, err = served.finished(served.client(good, empty))
    assert code == 2 and out == ""
    assert err.splitlines()[0] == (f"storagetm: {empty}: is empty (0 bytes); an NVMe namespace needs at least one "
                                   f"512-byte block (give it a size, e.g. truncate -s 1G {empty})")  # fmt: skip
    assert served.subsystems() == [] and served.daemon.handed == {} and served.daemon.disks == {}


def test_a_disk_in_use_is_refused_and_its_companions_are_not_exported(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    busy = Disk(name="sdx", devnode="/dev/sdx", devnum=0x810, devtype="disk", size=MiB, serial="SDX1")
    daemon = attached(tmp_path, Settings(all_disks=True), fake,
                      held=lambda devnode: "in use by qemu (pid 7)" if devnode == busy.devnode else "")  # fmt: skip
    daemon.disks = {busy.devnode: busy}
    daemon.export_wanted()
    assert daemon.state.exports == {}
    server = ControlServer(str(tmp_path / "run" / "control"))
    served = Served(daemon, fake, server.path, server)
    try:
        code, _, err = served.finished(served.client(image(tmp_path, "free.img"), "sdx"))
        assert code == 1
        assert err.splitlines()[0] == ("storagetm: not exporting /dev/sdx: in use by qemu (pid 7); stop using it "
                                       "first, or give --all twice (exports every disk)")  # fmt: skip
        assert served.subsystems() == [] and daemon.handed == {} and list(daemon.disks) == [busy.devnode]
        code, _, err = served.finished(served.client("sdz"))
        assert code == 1 and err.startswith("storagetm: no disk matches 'sdz': name an image file, a block device")
    finally:
        server.close()


def test_a_file_the_daemon_exports_anyway_stays_exported_when_the_client_goes(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    own = image(tmp_path, "own.img")
    daemon = attached(tmp_path, Settings(devices=(own,)), fake)
    daemon.disks = {own: disk_from_file(own)}
    daemon.export_wanted()
    (nqn,) = daemon.state.exports
    server = ControlServer(str(tmp_path / "run" / "control"))
    served = Served(daemon, fake, server.path, server)
    try:
        proc = served.client(own)
        served.pump(lambda: bool(daemon.handed))
        assert proc.stdout is not None and select.select([proc.stdout], [], [], 30)[0]
        proc.send_signal(signal.SIGTERM)
        code, out, err = served.finished(proc)
    finally:
        server.close()
    assert code == 0 and f"exported {own} (read-write) as {nqn}" in err
    assert out.rstrip().endswith("Stopping: nothing withdrawn; the running storagetm goes on exporting them.")
    assert served.subsystems() == [nqn] and own in daemon.disks and daemon.handed == {}


def test_a_peer_that_is_not_the_allowed_user_is_refused(served: Served, tmp_path: Path) -> None:
    served.server.allowed_uid = os.getuid() + 1  # SO_PEERCRED says the test's own uid
    code, out, err = served.finished(served.client(image(tmp_path, "x.img")))
    assert code == 1 and "refused the hand-over: only root may hand exports to storagetm" in err
    assert served.subsystems() == [] and served.daemon.handed == {}


SYSTEM_PYTHON = "/usr/bin/python3"  # one that another user may run (the suite's venv may be in root's home)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root and /usr/bin/python3")
def test_another_user_is_kept_out_by_the_socket_mode_and_by_its_credentials(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    daemon = attached(tmp_path, Settings(all_disks=True), fake)
    directory = tempfile.mkdtemp(prefix="storagetm-control-")
    os.chmod(directory, 0o711)  # others may pass through, as to /run/storagetm they may not
    server = ControlServer(os.path.join(directory, "control"))
    served = Served(daemon, fake, server.path, server)
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES'); sys.exit()\n"
             "print(s.recv(4096).split(b'\\0')[0].decode())")  # fmt: skip
    try:
        def as_nobody() -> subprocess.Popen[str]:
            return subprocess.Popen([SYSTEM_PYTHON, "-c", probe, server.path], user=65534, text=True,
                                    stdout=subprocess.PIPE)  # fmt: skip

        proc = as_nobody()
        assert served.finished(proc)[1].strip() == "EACCES"  # 0600, root's
        os.chmod(server.path, 0o666)  # were the mode wrong, the credentials still keep others out
        proc = as_nobody()
        assert served.finished(proc)[1].strip() == "refused"
        assert daemon.handed == {}
    finally:
        server.close()
        os.rmdir(directory)


def test_without_a_daemon_the_command_starts_its_own_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No socket, or one nobody listens on: today's path, which checks the file itself."""
    missing = str(tmp_path / "missing.img")
    assert cli.main([missing]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.makedirs(os.path.dirname(control.CONTROL_SOCKET), exist_ok=True)
    stale.bind(control.CONTROL_SOCKET)
    stale.close()  # a killed daemon's socket file: connection refused
    assert control.hand_over([missing]) is None
    assert cli.main([missing]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
