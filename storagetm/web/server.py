"""The web server: the page, status.json, the disks as downloads, the helper.

The standard library's ThreadingHTTPServer with a handler of our own, no framework: the
image has python3 and nothing else to spare, the routes are six, and the downloads need
what no framework gives for free anyway (sendfile from a read-only device, ranges across
the raw data and a VHD footer). One thread per connection, at most MAX_CONNECTIONS at once:
the rest get a short 503. Stopped, it shuts every connection down and waits for its
threads, so that no file descriptor of an exported device is left open when the exports
are withdrawn."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import selectors
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from storagetm.model import IO_TRSVCID, HashProgress
from storagetm.state import RunState
from storagetm.system.log import Logger
from storagetm.web import page, vhd
from storagetm.web.hashing import Hashes, HashJob, HashKey
from storagetm.web.images import Image, images, open_read_only
from storagetm.web.links import NO_DOWNLOADS
from storagetm.web.listen import listen
from storagetm.web.ranges import Unsatisfiable, byte_range
from storagetm.web.token import COOKIE, QUERY, matches

log = Logger(__name__)

HELPER_FILE = Path("/usr/share/storagetm/storagetm.pyz")  # the initiator-side helper, built into the image
MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 60.0  # seconds a connection may send nothing before it is closed
STOP_WAIT = 5.0  # seconds stop() waits for each connection's thread
SENDFILE_CHUNK = 16 << 20  # bytes per sendfile call
DISK_PATH = re.compile(r"/disks/([^/]+)\.(img|vhd|sha256)")
_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s#'\"]*", re.IGNORECASE)
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
         b"Connection: close\r\n\r\ntoo many connections; try again.\r\n")  # fmt: skip
_VHD_NAMESPACE = uuid.UUID("b7f0b6c2-2f0e-4c52-9a37-73746d766864")


def redacted(text: str) -> str:
    """`text` with any token value cut out: for logs."""
    return _TOKEN_IN_TEXT.sub(r"\1…", text)


def send_from(sock: socket.socket, fd: int, offset: int, count: int, timeout: float | None) -> int:
    """`count` bytes of `fd` from `offset` to `sock` by os.sendfile (kernel to socket, no
    copy through Python); the bytes sent, fewer if the source ended. Not socket.sendfile():
    it takes the size from fstat, which is 0 for a block device, and then sends nothing."""
    sent = 0
    with selectors.PollSelector() as writable:
        writable.register(sock.fileno(), selectors.EVENT_WRITE)
        while sent < count:
            try:
                done = os.sendfile(sock.fileno(), fd, offset + sent, min(count - sent, SENDFILE_CHUNK))
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                if not writable.select(timeout):
                    raise TimeoutError("the client takes nothing") from None
                continue
            if done == 0:
                break
            sent += done
    return sent


class Changing(Exception):
    """The disk's export is being changed or withdrawn: its device is not to be opened now."""


def generation(image: Image, state: RunState) -> int:
    """What changes when the disk's content may have: bytes written to its device since
    export (its block-layer counter), or a regular file's mtime; -1 if neither is known."""
    activity = state.activity.get(image.export.nqn)
    if activity is not None:
        return activity.written_bytes
    with contextlib.suppress(OSError):
        st = os.stat(image.path)
        if stat.S_ISREG(st.st_mode):
            return st.st_mtime_ns
    return -1


class WebServer:
    """Serves what `get_state()` returns at each request: the daemon's live RunState."""

    def __init__(self, get_state: Callable[[], RunState], port: int, *, host: str | None = None,
                 io_port: int = IO_TRSVCID, helper: Path = HELPER_FILE,
                 max_connections: int = MAX_CONNECTIONS, poll: float = 0.5) -> None:  # fmt: skip
        self.get_state = get_state
        self.port = port
        self.host = host  # None: every address, IPv6 and IPv4 on one socket
        self.io_port = io_port
        self.helper = helper
        self.max_connections = max_connections
        self.poll = poll  # seconds between looks at a stop request (each a wake-up of the target's CPU)
        self.hashes = Hashes()
        # Devices being let go of (release() to resume()): nothing opens them meanwhile, or
        # their removal fails busy. One lock with the server's, so that a download is either
        # seen by release() or refused.
        self.lock = threading.Condition()
        self.releasing: set[str] = set()
        self.readers: dict[str, int] = {}  # device -> requests holding it open
        self.started = int(time.time())  # the VHD footers' timestamp: the same for every request of this run
        self.httpd: _Server | None = None
        self.thread: threading.Thread | None = None

    def start(self, listening: socket.socket | None = None) -> None:
        """Serve in a thread of its own, on `listening` or a socket bound now; OSError if the
        port cannot be had."""
        self.httpd = _Server(self, listening or listen(self.host, self.port))
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(self.poll,), name="web", daemon=True)
        self.thread.start()
        log.debug("web server started")

    @property
    def address(self) -> tuple[str, int]:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def hash_status(self, state: RunState) -> dict[str, HashProgress]:
        """NQN -> its disk's sha256 computation, running or done (for the screen and `status`).
        Nothing is opened: the size is the one the disk was exported with (a resize re-exports)."""
        found = images(state)
        now = {name: HashKey(image.path, image.export.disk.size, image.mode.value, generation(image, state))
               for name, image in found.items()}  # fmt: skip
        return {found[name].export.nqn: progress for name, progress in self.hashes.shown(now).items()}

    def release(self, paths: set[str]) -> None:
        """Close every download and hash computation reading these devices, and wait until
        they let go: the exports on them are about to be withdrawn or changed (a device
        mapper device held open cannot be removed). Until resume(), nothing opens them."""
        with self.lock:
            self.releasing |= paths
        if self.httpd is not None:
            self.httpd.close_connections(paths)
        with self.lock:
            self.lock.wait_for(lambda: not any(self.readers.get(path) for path in paths), STOP_WAIT)
        self.hashes.release(paths)  # after the readers: none of them can start a computation now

    def resume(self, paths: set[str]) -> None:
        """The change of these devices' exports is over: they may be opened again."""
        with self.lock:
            self.releasing -= paths

    @contextlib.contextmanager
    def reading(self, path: str) -> Iterator[None]:
        """Hold `path` for a request that opens it; Changing while it is being released."""
        with self.lock:
            if path in self.releasing:
                raise Changing(path)
            self.readers[path] = self.readers.get(path, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.readers[path] -= 1
                self.lock.notify_all()

    def stop(self) -> None:
        if self.httpd is None:
            return
        self.httpd.shutdown()
        self.httpd.close_connections()
        self.httpd.server_close()
        self.hashes.stop()
        self.httpd = None
        log.debug("web page stopped")

    def hash_key(self, image: Image, state: RunState) -> HashKey | None:
        """What the disk's sha256 is of; None if its device cannot be opened. Changing while
        it is being released."""
        with self.reading(image.path):
            try:
                fd, size = open_read_only(image.path)
            except OSError:
                return None
            os.close(fd)
        return HashKey(image.path, size, image.mode.value, generation(image, state))

    def footer(self, image: Image, size: int) -> bytes:
        unique = uuid.uuid5(_VHD_NAMESPACE, f"{image.export.nqn}:{size}")
        return vhd.footer(size, self.started, unique)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() waits itself, with a limit

    def __init__(self, web: WebServer, listening: socket.socket) -> None:
        self.web = web
        self.address_family = listening.family
        self.slots = threading.BoundedSemaphore(web.max_connections)
        self.lock = web.lock
        self.active: dict[socket.socket, threading.Thread] = {}
        self.reading: dict[socket.socket, str] = {}  # the device each download is sending from
        super().__init__(listening.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()  # the one TCPServer made: the socket is the one bound already
        self.socket = listening
        self.server_address = listening.getsockname()
        # Not HTTPServer's server_bind: its getfqdn() asks DNS, which a target on a bare cable does not have.
        self.server_name, self.server_port = "storagetm", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.active[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.active.pop(request, None)
                self.reading.pop(request, None)
            self.slots.release()

    @contextlib.contextmanager
    def sending_from(self, request: socket.socket, path: str) -> Iterator[None]:
        """A download from `path`: seen by close_connections(), or Changing if being released."""
        with self.web.reading(path):
            with self.lock:
                self.reading[request] = path
            try:
                yield
            finally:
                with self.lock:
                    self.reading.pop(request, None)

    def close_connections(self, paths: set[str] | None = None) -> None:
        """Every connection, or those sending from one of `paths`; waits for their threads."""
        with self.lock:
            active = {sock: thread for sock, thread in self.active.items()
                      if paths is None or self.reading.get(sock) in paths}  # fmt: skip
        for sock in active:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in active.values():
            thread.join(STOP_WAIT)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web: request from %s failed", client_address[0], exc_info=True)


class Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "storagetm"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    # ---- logging: debug level, never the token --------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web %s: %s", self.client_address[0], redacted(format % args))

    # ---- requests ----------------------------------------------------------------

    def do_GET(self) -> None:
        self.respond(head=False)

    def do_HEAD(self) -> None:
        self.respond(head=True)

    def respond(self, head: bool) -> None:
        state = self.server.web.get_state()
        url = urlsplit(self.path)
        if not self.allowed(state.web.token, url.path, url.query):
            return
        try:
            self.route(state, url.path, head)
        except Changing:
            self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, "disk is changing, retry in a moment\n", head, refresh=2)

    def route(self, state: RunState, path: str, head: bool) -> None:
        web = self.server.web
        if path == "/":
            self.page(state, head)
        elif path == "/status.json":
            body = json.dumps(state.without_secrets().to_json(), indent=1).encode() + b"\n"
            self.send_body(HTTPStatus.OK, "application/json", body, head)
        elif path == page.HELPER and web.helper.is_file():
            self.send_file(str(web.helper), "storagetm.pyz", head)
        elif path.startswith("/disks/") and not state.web.downloads:
            self.send_text(HTTPStatus.FORBIDDEN, NO_DOWNLOADS + "\n", head)
        elif (match := DISK_PATH.fullmatch(path)) and (image := images(state).get(match.group(1))):
            if match.group(2) == "sha256":
                self.sha256(image, state, head)
            else:
                self.send_image(image, match.group(2) == "vhd", head)
        else:
            self.send_text(HTTPStatus.NOT_FOUND, "not found: only exported disks are here; see /\n", head)

    def allowed(self, token: str, path: str, query: str) -> bool:
        """With a token: a right `?token=` sets the cookie and sends the browser to the same
        address without it (out of the address bar, history and logs); a right cookie passes;
        anything else gets 403."""
        if not token:
            return True
        params = parse_qsl(query, keep_blank_values=True)
        given = [value for key, value in params if key == QUERY]
        if given and matches(given[-1], token):
            rest = urlencode([(key, value) for key, value in params if key != QUERY])
            self.send_response(HTTPStatus.SEE_OTHER)
            here = "/" + path.lstrip("/")  # "//host/…" would send the browser to another host
            self.send_header("Location", here + (f"?{rest}" if rest else ""))
            self.send_header("Set-Cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        if not given and matches(self.cookie(), token):
            return True
        refusal = page.refused().encode()
        self.send_body(HTTPStatus.FORBIDDEN, "text/html; charset=utf-8", refusal, self.command == "HEAD")
        return False

    def cookie(self) -> str:
        try:
            cookies = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return ""
        morsel = cookies.get(COOKIE)
        return morsel.value if morsel is not None else ""

    def page(self, state: RunState, head: bool) -> None:
        web = self.server.web
        found = images(state)
        jobs: dict[str, HashJob | None] = {}
        for name, image in found.items():
            try:
                key = web.hash_key(image, state)
            except Changing:  # the page still shows, without this disk's sha256
                key = None
            jobs[name] = web.hashes.current(name, key) if key else None
        host = self.headers.get("Host") or f"{self.server.server_name}"
        view = page.Page(host=host, io_port=web.io_port, token=bool(state.web.token), helper=web.helper.is_file(),
                         downloads=state.web.downloads)  # fmt: skip
        body = page.render(state, view, found, jobs).encode()
        self.send_body(HTTPStatus.OK, "text/html; charset=utf-8", body, head)

    def sha256(self, image: Image, state: RunState, head: bool) -> None:
        web = self.server.web
        key = web.hash_key(image, state)
        if key is None:
            self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot open {image.name}'s device\n", head)
            return
        with web.reading(image.path):  # a computation is not started on a device being released
            job = web.hashes.current(image.name, key) if head else web.hashes.request(image.name, key)
        if job is not None and job.finished and job.digest:
            self.send_text(HTTPStatus.OK, f"{job.digest}  {image.name}.img\n", head)
        elif job is not None and job.error:
            self.send_text(HTTPStatus.INTERNAL_SERVER_ERROR, f"sha256 of {image.name}: {job.error}\n", head)
        else:
            done = job.fraction if job else 0.0
            self.send_text(HTTPStatus.ACCEPTED, f"computing the sha256 of {image.name}: {done:.0%}; ask again\n",
                           head, refresh=2)  # fmt: skip

    # ---- bodies --------------------------------------------------------------------

    def send_text(self, status: HTTPStatus, text: str, head: bool, refresh: int = 0) -> None:
        self.send_body(status, "text/plain; charset=utf-8", text.encode(), head, refresh)

    def send_body(self, status: HTTPStatus, kind: str, body: bytes, head: bool, refresh: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if refresh:
            self.send_header("Refresh", str(refresh))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_image(self, image: Image, as_vhd: bool, head: bool) -> None:
        with self.server.sending_from(self.connection, image.path):  # held before it is opened
            try:
                fd, size = open_read_only(image.path)
            except OSError as exc:
                self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot open {image.name}: {exc.strerror}\n", head)
                return
            self.send_device(image, fd, size, as_vhd, head)

    def send_device(self, image: Image, fd: int, size: int, as_vhd: bool, head: bool) -> None:
        with os.fdopen(fd, "rb", buffering=0) as device:
            if as_vhd and size % vhd.SECTOR:
                self.send_text(HTTPStatus.NOT_FOUND, f"{image.name} is not whole 512-byte sectors: no VHD\n", head)
                return
            tail = self.server.web.footer(image, size) if as_vhd else b""
            etag = hashlib.sha256(f"{image.export.nqn}:{size}:{image.mode.value}:{self.server.web.started}"
                                  .encode()).hexdigest()[:32]  # fmt: skip
            name = f"{image.name}.{'vhd' if as_vhd else 'img'}"
            self.send_ranged(device.fileno(), size, tail, name, f'"{etag}"', head)

    def send_file(self, path: str, name: str, head: bool) -> None:
        try:
            fd, size = open_read_only(path)
        except OSError as exc:
            self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot open {name}: {exc.strerror}\n", head)
            return
        with os.fdopen(fd, "rb", buffering=0) as file:
            etag = f'"{int(os.fstat(fd).st_mtime)}-{size}"'
            self.send_ranged(file.fileno(), size, b"", name, etag, head)

    def send_ranged(self, fd: int, size: int, tail: bytes, name: str, etag: str, head: bool) -> None:
        """`fd`'s `size` bytes then `tail`, whole or the one range asked for. The source's
        part goes by sendfile (kernel to socket, no copy through Python)."""
        total = size + len(tail)
        asked = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            asked = None  # the client's part is of something else: the whole of this one
        try:
            chosen = byte_range(asked, total)
        except Unsatisfiable:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{total}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        first, last = chosen if chosen else (0, total - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if chosen else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Content-Disposition", f'attachment; filename="{name}"')
        if chosen:
            self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
        self.end_headers()
        if head:
            return
        if first < size:
            count = min(last + 1, size) - first
            if send_from(self.connection, fd, first, count, self.timeout) != count:  # it shrank
                self.close_connection = True
                return
        if last >= size:
            self.wfile.write(tail[max(first - size, 0) : last + 1 - size])
