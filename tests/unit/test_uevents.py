"""The kernel's block uevents read from netlink: parsed as disk_from_sysfs needs them, every
other subsystem dropped unparsed, and nothing believed that does not come from the kernel."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from storagetm.disks.uevents import NETLINK_KOBJECT_UEVENT, KernelUevents, Uevent, attach_filter, block_filter, parse


def message(*fields: str, header: str = "add@/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb") -> bytes:
    return "\0".join((header, *fields)).encode() + b"\0"


VDB = message("ACTION=add", "DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb", "SUBSYSTEM=block",
              "MAJOR=253", "MINOR=16", "DEVNAME=vdb", "DEVTYPE=disk", "DISKSEQ=9", "SEQNUM=2210")  # fmt: skip


def test_a_block_uevent_gives_what_disk_from_sysfs_reads() -> None:
    assert parse(VDB) == Uevent(action="add", sys_path="/sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vdb",
                                sys_name="vdb", device_node="/dev/vdb", device_number=os.makedev(253, 16),
                                device_type="disk", sequence_number=2210)  # fmt: skip


def test_other_subsystems_and_broken_messages_are_dropped() -> None:
    assert parse(message("ACTION=add", "DEVPATH=/devices/virtual/net/lo", "SUBSYSTEM=net", "SEQNUM=3")) is None
    assert parse(message("ACTION=add", "SUBSYSTEM=block", "SEQNUM=3")) is None  # no DEVPATH
    assert parse(message("ACTION=add", "DEVPATH=/devices/x/block/vdb", "SUBSYSTEM=block", "MAJOR=x")) is None
    assert parse(b"") is None and parse(b"\xff\xfe\0SUBSYSTEM=block\0") is None
    assert parse(message("ACTION=add", "DEVPATH=/devices/x", "SUBSYSTEM=net", "NOTE=\0SUBSYSTEM=block")) is None
    removed = parse(message("ACTION=remove", "DEVPATH=/devices/x/block/vdb", "SUBSYSTEM=block", "SEQNUM=5"))
    assert removed is not None and removed.action == "remove" and removed.device_node is None


@pytest.mark.skipif(os.geteuid() != 0, reason="sending on this netlink family needs CAP_NET_ADMIN")
def test_a_message_from_a_process_is_not_taken_for_the_kernels() -> None:
    """A privileged process may send to the socket's port too; only port 0 is the kernel."""
    monitor = KernelUevents()
    monitor.start()
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
    try:
        forger.bind((0, 0))
        for _ in range(3):
            forger.sendto(VDB, (monitor.sock.getsockname()[0], 0))  # type: ignore[union-attr]
        time.sleep(0.05)
        assert monitor.poll(0) is None
        assert monitor.sock is not None
        with pytest.raises(BlockingIOError):  # all three read and dropped in that one call
            monitor.sock.recv(8192)
    finally:
        forger.close()
        monitor.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="sending on this netlink family needs CAP_NET_ADMIN")
def test_the_socket_filter_lets_only_block_uevents_through() -> None:
    """The filter runs in the host's kernel here: messages sent to a socket carrying it, and
    what arrives."""
    receiver = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT)
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
    try:
        attach_filter(receiver, block_filter())
        receiver.bind((0, 0))
        sender.bind((0, 0))
        deep = "/devices/" + "/".join(f"SUB{n}" for n in range(36)) + "/block/"
        deep += "s" * (285 - len(deep))  # the longest DEVPATH the window is for, "SUB" in it
        sent = {
            "vdb": (VDB, True),
            "deep": (message("ACTION=add", f"DEVPATH={deep}", "SUBSYSTEM=block", "SEQNUM=9", header=f"add@{deep}"),
                     True),
            "net": (message("ACTION=add", "DEVPATH=/devices/virtual/net/lo", "SUBSYSTEM=net", "SEQNUM=3"), False),
            "blockx": (message("ACTION=add", "DEVPATH=/devices/x", "SUBSYSTEM=blockx", "SEQNUM=4"), False),
            "bdi": (message("ACTION=add", "DEVPATH=/devices/virtual/bdi/253:0", "SUBSYSTEM=bdi", "SEQNUM=5"), False),
            # "add": the key at 2 * len(DEVPATH) + 24; the window ends at 599.
            "last": (message("ACTION=add", f"DEVPATH={deep:x<287}", "SUBSYSTEM=net", header=f"add@{deep:x<287}"),
                     False),  # at 598, still looked at
            "beyond": (message("ACTION=add", f"DEVPATH={deep:x<288}", "SUBSYSTEM=net", header=f"add@{deep:x<288}"),
                       True),  # at 600: the reader decides
        }
        for text, _ in sent.values():
            sender.sendto(text, (receiver.getsockname()[0], 0))
        time.sleep(0.05)
        arrived = []
        with contextlib.suppress(BlockingIOError):
            while True:
                arrived.append(receiver.recv(8192))
        assert arrived == [text for text, passes in sent.values() if passes]
    finally:
        receiver.close()
        sender.close()


def test_the_filter_fits_the_kernels_limit_and_every_jump_lands_inside() -> None:
    program = block_filter()
    assert len(program) <= 4096  # BPF_MAXINSNS
    assert len(block_filter(window=3)) == 3 * 4 + 1 + 8 + 2
    for at, (code, jt, jf, k) in enumerate(program):
        targets = [at + 1 + k] if code == 0x05 else [at + 1 + jt, at + 1 + jf] if code == 0x15 else []
        assert all(at < target < len(program) for target in targets)
    assert program[-1][0] == program[-2][0] == 0x06  # ends with its two returns


def test_a_cciss_style_name_reads_as_udev_names_it() -> None:
    event = parse(message("ACTION=add", "DEVPATH=/devices/pci0000:00/0000:00:05.0/cciss0/c0d0/block/cciss!c0d0",
                          "SUBSYSTEM=block", "DEVNAME=cciss/c0d0", "MAJOR=104", "MINOR=0"))  # fmt: skip
    assert event is not None and event.sys_name == "cciss/c0d0" and event.device_node == "/dev/cciss/c0d0"
