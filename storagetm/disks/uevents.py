"""The kernel's block-device uevents, read from its netlink socket ourselves.

libudev's kernel-source monitor cannot filter in the kernel: its socket filter only looks at
messages that carry udev's own header, so every uevent of every subsystem (several hundred
while udev replays the devices at boot) woke the daemon and went through pyudev to be thrown
away, some 2 ms each under TCG. Here a classic-BPF socket filter drops, in the kernel, every
message whose SUBSYSTEM is not block; what gets through is parsed only as far as
disk_from_sysfs reads it (sysfs holds the rest), and a burst is drained in one wake-up.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from msgspec import Struct

from storagetm.system.log import Logger

log = Logger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's own messages; udev re-broadcasts its finished ones on group 2
RECEIVE_BUFFER = 16 << 20  # a coldplug burst must not overflow it (ENOBUFS loses events)
MAX_MESSAGE = 8192  # more than a uevent can hold (UEVENT_BUFFER_SIZE, 2048 in lib/kobject_uevent.c)
BLOCK = b"\0SUBSYSTEM=block\0"
SO_ATTACH_FILTER = 26
# Classic BPF (linux/filter.h): load a big-endian word at k, at X+k, a byte at X+k; X = k; jumps; return.
LD_W_ABS, LD_W_IND, LD_B_IND, LDX_IMM, JA, JEQ_K, RET_K = 0x20, 0x40, 0x50, 0x01, 0x05, 0x15, 0x06
PASS, DROP = 0xFFFFFFFF, 0
# The kernel writes ACTION, DEVPATH, then SUBSYSTEM (kobject_uevent_env), after an "ACTION@DEVPATH"
# header: the key starts at most at 2 * len(DEVPATH) + 30 ("change"/"remove"), i.e. within 600
# bytes for a DEVPATH of up to 284 characters (a disk behind three USB hubs has some 110). A
# message with its key further on is let through to the reader. 600 offsets at 4 instructions
# each: the kernel charges the filter, converted, to the socket's option memory
# (net.core.optmem_max; 959 offsets fitted in 6.18's 128 KiB).
FILTER_WINDOW = 600


def _word(text: bytes) -> int:
    return int.from_bytes(text, "big")


def block_filter(window: int = FILTER_WINDOW) -> list[tuple[int, int, int, int]]:
    """The filter's program, (code, jt, jf, k) each: find "\0SUB" at the first offset it occurs
    (the SUBSYSTEM key: nothing before it holds a NUL followed by that), then pass the message if
    the key reads "\0SUBSYSTEM=block\0", else drop it."""
    program: list[tuple[int, int, int, int]] = []
    verify = 4 * window + 1
    for offset in range(window):
        program += [(LD_W_ABS, 0, 0, offset), (JEQ_K, 0, 2, _word(b"\0SUB")), (LDX_IMM, 0, 0, offset),
                    (JA, 0, 0, verify - (len(program) + 4))]  # fmt: skip
    program.append((RET_K, 0, 0, PASS))  # no key within the window: the reader decides
    checks = [(LD_W_IND, 4, b"SYST"), (LD_W_IND, 8, b"EM=b"), (LD_W_IND, 12, b"lock"), (LD_B_IND, 16, b"\0")]
    for at, (code, offset, expected) in enumerate(checks):
        program += [(code, 0, 0, offset), (JEQ_K, 0, 2 * (len(checks) - at) - 1, _word(expected))]
    program += [(RET_K, 0, 0, PASS), (RET_K, 0, 0, DROP)]
    return program


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", len(program), ctypes.addressof(buffer)))


class Uevent(Struct, frozen=True):
    """One kernel uevent of a block device, with the part of pyudev.Device we read."""

    action: str
    sys_path: str
    sys_name: str
    device_node: str | None
    device_number: int
    device_type: str | None
    sequence_number: int
    subsystem: str = "block"


def parse(message: bytes) -> Uevent | None:
    """A block device's event from one netlink message ("add@/devices/…\\0KEY=value\\0…"); None
    for any other subsystem or a message without the fields every block uevent has."""
    if BLOCK not in message:  # cheap: most messages stop here when the socket filter is missing
        return None
    fields: dict[str, str] = {}
    for item in message.decode("utf-8", "replace").split("\0")[1:]:
        key, equals, value = item.partition("=")
        if equals:
            fields.setdefault(key, value)  # the first: the kernel's SUBSYSTEM is the third key
    action, devpath = fields.get("ACTION"), fields.get("DEVPATH")
    if not action or not devpath or fields.get("SUBSYSTEM") != "block":
        return None
    try:
        number = os.makedev(int(fields.get("MAJOR", "0")), int(fields.get("MINOR", "0")))
        seqnum = int(fields.get("SEQNUM", "0"))
    except ValueError:
        return None
    devname = fields.get("DEVNAME")
    return Uevent(action=action, sys_path="/sys" + devpath, sys_name=devpath.rsplit("/", 1)[-1].replace("!", "/"),
                  device_node=("/dev/" + devname.removeprefix("/dev/")) if devname else None,
                  device_number=number, device_type=fields.get("DEVTYPE"), sequence_number=seqnum)  # fmt: skip


class KernelUevents:
    """A monitor with pyudev's `start()`/`fileno()`/`poll(timeout=0)`, for the kernel's block
    uevents only. Messages from anyone but the kernel (netlink port 0) are ignored."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             NETLINK_KOBJECT_UEVENT)  # fmt: skip
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), RECEIVE_BUFFER)
        except OSError:  # not root: the ordinary limit
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            attach_filter(sock, block_filter())
        except OSError as exc:  # less option memory (net.core.optmem_max): every message comes up, and is read
            log.info("no socket filter on the kernel's uevents (%s): each uevent wakes storagetm", exc.strerror)
        sock.bind((0, KERNEL_GROUP))
        self.sock = sock

    def fileno(self) -> int:
        assert self.sock is not None, "start() first"
        return self.sock.fileno()

    def poll(self, timeout: float = 0) -> Uevent | None:
        """The next block-device event waiting, skipping every other; None once none waits."""
        assert self.sock is not None and timeout == 0, "non-blocking reads only"
        while True:
            try:
                message, sender = self.sock.recvfrom(MAX_MESSAGE)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Some were lost: udev's event for each such disk still comes, and reads sysfs then.
                log.debug("kernel uevents lost (receive buffer full); udev's events stand in")
                continue
            if sender[0] != 0:
                continue
            if (event := parse(message)) is not None:
                return event

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
