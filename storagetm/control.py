"""The control socket: `storagetm FILE…` on a running image hands its files to the running
daemon, as systemd's tools talk to their services, instead of starting a second engine.

Both ends are here, on the standard library only: the client runs before anything else is
imported. One AF_UNIX SOCK_SEQPACKET socket, /run/storagetm/control, 0600 in the daemon's
0700 directory; the daemon also checks the peer's credentials (SO_PEERCRED: root only).
A message is a verb and its fields, NUL-separated (a path holds no NUL).

    daemon -> client   ready           the peer is root (or: refused LINE, and the connection ends)
    client -> daemon   export SPEC…    the client's files and disks, exported until it goes
                       withdraw        withdraw them now (the client ends: Ctrl+C, SIGTERM)
    daemon -> client   exported SCREEN LOG   the screen for these exports, the log lines
                       failed CODE LINE      nothing of the request is exported
                       withdrawn LINE        the farewell line, after the disks were flushed

The export lasts as long as the client's connection: when it closes (the client ended or
was killed), the daemon withdraws what it handed over, exactly as for `withdraw`.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

# The client imports nothing it does not run: typing (or contextlib) alone costs milliseconds,
# tens of them in the VM. typing.TYPE_CHECKING without importing typing; mypy knows the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import selectors
    from collections.abc import Sequence
    from typing import Protocol

    class Exporter(Protocol):
        """What the daemon does for a client (daemon.Daemon)."""

        def export_handed(self, client: int, specs: Sequence[str]) -> tuple[int, str, list[str]]:
            """(0, screen, log lines) once every spec is exported, else (exit code, "", [the
            one line]) with nothing of them exported."""
            ...

        def withdraw_handed(self, client: int) -> tuple[str, list[str]]:
            """Withdraw what `client` handed over (unless still wanted otherwise): (farewell,
            log lines)."""
            ...

CONTROL_SOCKET = "/run/storagetm/control"
MAX_MESSAGE = 1 << 20  # bytes: 32 file paths are a few KiB; a screen a few more
WITHDRAW_TIMEOUT = 120.0  # seconds the client waits for the withdrawal (the disks are flushed first)
EXIT_FAILURE = 1  # as errors.ExitCode, which the client does not import
EVENT_READ = 1  # selectors.EVENT_READ
ENVIRONMENT = ("SYSTEMD_NVME_MODEL", "SYSTEMD_NVME_FIRMWARE", "SYSTEMD_NVME_SERIAL", "SYSTEMD_NVME_UUID")


def encode(verb: str, fields: Sequence[str] = ()) -> bytes:
    return b"\0".join(os.fsencode(part) for part in (verb, *fields))


def decode(message: bytes) -> tuple[str, list[str]]:
    verb, *fields = (os.fsdecode(part) for part in message.split(b"\0"))
    return verb, fields


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel recorded it at connect()."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(uid)


# ---- the client: `storagetm FILE…` ----------------------------------------------------


def handover_specs(argv: Sequence[str], commands: Sequence[str]) -> list[str] | None:
    """The DEVICE|FILE arguments if this command line can be handed to a running daemon:
    positional arguments only, no $SYSTEMD_NVME_* identity (the daemon's disks have theirs).
    Anything else (options, subcommands) goes today's way."""
    if not argv or argv[0] in commands or any(arg.startswith("-") or not arg for arg in argv):
        return None
    if any(name in os.environ for name in ENVIRONMENT):
        return None
    return [os.path.abspath(arg) if _a_file(arg) else arg for arg in argv]


def _a_file(arg: str) -> bool:
    """Whether the daemon, in another directory, needs the argument as an absolute path: a
    path, or a file here named like no disk (as disks.disk.resolve_file reads it)."""
    if "/" in arg or arg.startswith("."):
        return True
    return not os.path.exists(f"/sys/class/block/{arg}") and os.path.isfile(arg)


class _Stop(Exception):
    """SIGTERM or SIGHUP reached the client while it waited."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def hand_over(specs: Sequence[str], path: str | None = None) -> int | None:
    """Export `specs` through the running daemon and wait until this process is told to end;
    the exit code, or None if no daemon listens here (the caller starts the engine itself)."""
    if os.geteuid() != 0:
        return None  # the engine's path says that storagetm needs root
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path or CONTROL_SOCKET)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError):
        sock.close()
        return None
    with sock:
        try:
            return _converse(sock, specs)
        except OSError as exc:  # the daemon went away mid-way (killed), or did not answer in time
            _error(f"lost the running storagetm: {exc.strerror or 'no answer'}; `storagetm status` shows what "
                   "it exports")  # fmt: skip
            return EXIT_FAILURE


def _converse(sock: socket.socket, specs: Sequence[str]) -> int:
    # From the start: a SIGTERM while the request is under way withdraws what it exported.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        try:
            verb, fields = decode(sock.recv(MAX_MESSAGE))  # "ready", once the daemon knows who we are
            if verb != "ready":
                return _not_exported(verb, fields)
            sock.sendall(encode("export", specs))
            verb, fields = decode(sock.recv(MAX_MESSAGE))
            if verb != "exported":
                return _not_exported(verb, fields)
            _logged(fields[1])
            print(fields[0], flush=True)
            if sock.recv(MAX_MESSAGE) == b"":  # nothing comes until the daemon ends
                _error("the running storagetm stopped; its exports, these too, are withdrawn")
                return EXIT_FAILURE
        except (_Stop, KeyboardInterrupt):
            pass
        for sig in previous:  # the withdrawal is not interrupted: a second Ctrl+C would leave no farewell
            signal.signal(sig, signal.SIG_IGN)
        return _withdraw(sock)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _not_exported(verb: str, fields: list[str]) -> int:
    if verb == "failed":
        _error(fields[1])
        return int(fields[0])
    _error("the running storagetm refused the hand-over" + (f": {fields[0]}" if fields else ""))
    return EXIT_FAILURE


def _withdraw(sock: socket.socket) -> int:
    """Ask for the withdrawal and wait for it (replies to the request may still come first)."""
    try:
        sock.sendall(encode("withdraw"))
    except OSError:  # the daemon closed the connection: it had exported nothing for it
        return EXIT_FAILURE
    sock.settimeout(WITHDRAW_TIMEOUT)
    while message := sock.recv(MAX_MESSAGE):
        verb, fields = decode(message)
        if verb == "withdrawn":
            _logged(fields[1] if len(fields) > 1 else "")
            if fields and fields[0]:
                print(fields[0], flush=True)
            return 0
        if verb in ("failed", "refused"):  # the request failed as the client was told to end
            return _not_exported(verb, fields)
    _error("the running storagetm did not confirm the withdrawal; `storagetm status` shows what it exports")
    return EXIT_FAILURE


def _error(line: str) -> None:
    print(f"storagetm: {line}", file=sys.stderr, flush=True)


def _logged(lines: str) -> None:
    """The daemon's log lines for this export, as the engine's own path logs them."""
    prefix = "" if os.environ.get("JOURNAL_STREAM") else "storagetm: "
    for line in lines.splitlines():
        print(f"{prefix}{line}", file=sys.stderr, flush=True)


# ---- the daemon's end -----------------------------------------------------------------


class ControlServer:
    """The daemon's listening socket and its clients, watched by the daemon's selector."""

    def __init__(self, path: str | None = None, *, allowed_uid: int = 0) -> None:
        self.path = path or CONTROL_SOCKET
        self.allowed_uid = allowed_uid
        self.listener: socket.socket | None = None
        self.clients: dict[int, socket.socket] = {}
        self.exporting: set[int] = set()  # clients whose export stands: one request per connection
        self.selector: selectors.BaseSelector | None = None

    def start(self, selector: selectors.BaseSelector) -> None:
        """Listen (a stale socket of a killed instance replaced) and be watched by `selector`."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        _unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old_umask = os.umask(0o177)  # 0600 from the start: no moment in which others may connect
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(8)
        self.listener, self.selector = listener, selector
        selector.register(listener, EVENT_READ, "control")

    def ready(self, fd: int, exporter: Exporter) -> None:
        """The selector saw `fd` (ours) readable: a new client, a request, or a client gone."""
        if self.listener is not None and fd == self.listener.fileno():
            self._accept()
            return
        sock = self.clients.get(fd)
        if sock is None:
            return
        try:
            message = sock.recv(MAX_MESSAGE)
        except OSError:
            message = b""
        verb, fields = decode(message) if message else ("", [])
        if verb == "export" and fields and fd not in self.exporting:
            code, screen, lines = exporter.export_handed(fd, fields)
            if code == 0:
                self.exporting.add(fd)
            reply = encode("exported", [screen, "\n".join(lines)]) if code == 0 else encode(
                "failed", [str(code), lines[0] if lines else "the export failed"])  # fmt: skip
            if not self._send(sock, reply) or code != 0:
                if code == 0:
                    exporter.withdraw_handed(fd)
                self._drop(fd)
            return
        # "withdraw", the connection closed (the client ended, or was killed), or a request out
        # of turn: what the client handed over is withdrawn, and the connection ends.
        farewell, lines = exporter.withdraw_handed(fd)
        if verb == "withdraw":
            self._send(sock, encode("withdrawn", [farewell, "\n".join(lines)]))
        self._drop(fd)

    def _accept(self) -> None:
        assert self.listener is not None and self.selector is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if peer_uid(sock) != self.allowed_uid:  # the socket's mode already keeps others out
            self._send(sock, encode("refused", ["only root may hand exports to storagetm"]))
            sock.close()
            return
        sock.setblocking(True)  # replies are small; the client reads them at once
        sock.settimeout(5.0)
        if not self._send(sock, encode("ready")):
            sock.close()
            return
        self.clients[sock.fileno()] = sock
        self.selector.register(sock, EVENT_READ, "control")

    @staticmethod
    def _send(sock: socket.socket, message: bytes) -> bool:
        try:
            sock.sendall(message)
        except OSError:
            return False
        return True

    def _drop(self, fd: int) -> None:
        self.exporting.discard(fd)
        sock = self.clients.pop(fd)
        if self.selector is not None:
            self.selector.unregister(sock)
        sock.close()

    def close(self) -> None:
        """Stop listening; the clients' connections close (they print that storagetm stopped).
        The daemon's selector may be closed already: it is left alone."""
        self.selector = None
        for sock in self.clients.values():
            sock.close()
        self.clients.clear()
        self.exporting.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            _unlink(self.path)


def _unlink(path: str) -> None:
    import contextlib  # the daemon's end: not on the client's path

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
