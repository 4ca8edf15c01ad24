"""The helper's commands on a host without NVMe-oF: a fake `nvme` on PATH answers the
discovery and records how it was called, the kernel's /dev/nvme-fabrics is a stand-in, and
mDNS answers come as resolvectl and avahi print them."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from storagetm.connection import ConnectionCode, encode
from storagetm.errors import StorageTMError, UsageError
from storagetm.initiator import commands, fabrics, mdns, record
from storagetm.initiator.fabrics import Credentials, Endpoint, Namespace
from storagetm.model import Listener
from storagetm.security.auth import generate_secret
from storagetm.security.tls import generate_key
from storagetm.state import RunState
from storagetm.system.network import Address

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
DISK1, DISK2 = f"{BASE}.qemu-harddisk-virt0001", f"{BASE}.qemu-nvme-ctrl-nvme0001"

DISCOVERY_8009 = {"genctr": 3, "records": [
    {"trtype": "tcp", "adrfam": "ipv6", "subtype": "nvme subsystem", "trsvcid": "8009",
     "subnqn": f"{BASE}:discovery-port", "traddr": "::", "sectype": "none"},
    {"trtype": "tcp", "adrfam": "ipv4", "subtype": "discovery subsystem referral", "trsvcid": "4420",
     "subnqn": "nqn.2014-08.org.nvmexpress.discovery", "traddr": "169.254.1.2", "sectype": "none"},
]}  # fmt: skip
DISCOVERY_4420 = {"genctr": 3, "records": [
    {"trtype": "tcp", "adrfam": "ipv6", "subtype": "current discovery subsystem", "trsvcid": "4420",
     "subnqn": "nqn.2014-08.org.nvmexpress.discovery", "traddr": "::", "sectype": "tls13"},
    {"trtype": "tcp", "adrfam": "ipv6", "subtype": "nvme subsystem", "trsvcid": "4420", "subnqn": DISK1,
     "traddr": "::", "sectype": "tls13"},
    {"trtype": "tcp", "adrfam": "ipv6", "subtype": "nvme subsystem", "trsvcid": "4420", "subnqn": DISK2,
     "traddr": "::", "sectype": "tls13"},
]}  # fmt: skip


def test_discovery_log_follows_the_referral_and_skips_the_anchor() -> None:
    calls: list[list[str]] = []

    def nvme(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        page = DISCOVERY_4420 if argv[argv.index("-s") + 1] == "4420" else DISCOVERY_8009
        return subprocess.CompletedProcess(argv, 0, json.dumps(page), "")

    records = fabrics.discover(Endpoint("169.254.1.2", 8009), Credentials(), nvme)
    assert [r.nqn for r in records] == [DISK1, DISK2]
    assert all(r.port == 4420 and r.tls for r in records)
    assert [c[c.index("-s") + 1] for c in calls] == ["8009", "4420"]


def test_the_connect_line_carries_secrets_to_the_kernel_and_link_local_its_interface() -> None:
    secret, ctrl = generate_secret(), generate_secret()
    line = fabrics.connect_options(Endpoint("fe80::1", 4420, "enp0s3"), DISK1, Credentials(HOST, secret, ctrl, True))
    options = line.split(",")
    assert "traddr=fe80::1%enp0s3" in options and "host_iface=enp0s3" in options and "trsvcid=4420" in options
    assert f"hostnqn={HOST}" in options and "hostid=11111111-2222-3333-4444-555555555555" in options
    assert f"dhchap_secret={secret}" in options and f"dhchap_ctrl_secret={ctrl}" in options and "tls" in options
    assert "fast_io_fail_tmo=10" in options  # I/O fails (the copy can say so) while it reconnects


def test_connect_writes_the_line_and_reads_the_controller() -> None:
    """The kernel answers a write to /dev/nvme-fabrics on the same descriptor: a raw pty
    stands in for it here."""
    import pty
    import threading
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)
    written: list[bytes] = []

    def kernel() -> None:
        written.append(os.read(master, 4096))
        os.write(master, b"instance=7,cntlid=1\n")

    thread = threading.Thread(target=kernel)
    thread.start()
    try:
        assert fabrics.connect(Endpoint("192.0.2.1", 4420), DISK1, Credentials(), Path(os.ttyname(slave))) == "nvme7"
    finally:
        thread.join()
        os.close(master)
        os.close(slave)
    assert written[0].startswith(b"transport=tcp,traddr=192.0.2.1,trsvcid=4420,nqn=" + DISK1.encode())


def test_link_local_is_tried_through_each_up_interface(tmp_path: Path) -> None:
    inet6 = tmp_path / "if_inet6"
    inet6.write_text("00000000000000000000000000000001 01 80 10 80       lo\n"
                     "fe800000000000005054fffe00000002 02 40 20 80   enp0s3\n"
                     "fe800000000000005054fffe00000003 03 40 20 80    wlan0\n"
                     "fe800000000000005054fffe00000004 04 40 20 80     eth9\n")  # fmt: skip
    for name, state in (("enp0s3", "up"), ("wlan0", "up"), ("eth9", "down")):
        (tmp_path / "class/net" / name).mkdir(parents=True)
        (tmp_path / "class/net" / name / "operstate").write_text(state + "\n")
    names = fabrics.up_interfaces_with_link_local(inet6, tmp_path)
    assert names == ["enp0s3", "wlan0"]
    assert fabrics.endpoints("fe80::1", 4420, lambda: names) == [Endpoint("fe80::1", 4420, "enp0s3"),
                                                                 Endpoint("fe80::1", 4420, "wlan0")]  # fmt: skip
    assert fabrics.endpoints("169.254.1.2", 4420, lambda: names) == [Endpoint("169.254.1.2", 4420)]


def test_connected_namespaces_from_sysfs(tmp_path: Path) -> None:
    subsys = tmp_path / "class/nvme-subsystem/nvme-subsys1"
    (subsys / "nvme1n1").mkdir(parents=True)
    (subsys / "nvme1c1n1").mkdir()
    (subsys / "nvme1").mkdir()
    (subsys / "subsysnqn").write_text(DISK1 + "\n")
    (subsys / "model").write_text("QEMU HARDDISK\n")
    (subsys / "serial").write_text("VIRT0001\n")
    (subsys / "nvme1n1/size").write_text("65536\n")
    assert fabrics.connected(tmp_path) == [Namespace(DISK1, "/dev/nvme1n1", "QEMU HARDDISK", "VIRT0001", 32 << 20,
                                                     ("nvme1",))]  # fmt: skip


def test_missing_pieces_are_one_line_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match=r"storagetm connect needs root") as info:
        fabrics.require_root("connect")
    assert "sudo storagetm connect" in info.value.one_line()
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(StorageTMError, match="nvme-cli is not installed"):
        fabrics.require_nvme_cli()
    failed = subprocess.CompletedProcess([], 1, "", "modprobe: FATAL: Module nvme-tcp not found")
    with pytest.raises(StorageTMError, match="the kernel has no nvme-tcp module: modprobe: FATAL"):
        fabrics.require_nvme_tcp(tmp_path, lambda _argv: failed)
    loaded: list[Sequence[str]] = []

    def modprobe(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        loaded.append(argv)
        (tmp_path / "module/nvme_tcp").mkdir(parents=True)
        return subprocess.CompletedProcess(argv, 0, "", "")

    fabrics.require_nvme_tcp(tmp_path, modprobe)
    assert loaded == [["modprobe", "nvme-tcp"]]


RESOLVECTL_PTR = """\
_nvme-disc._tcp.local IN PTR storagetm-0123456789ab._nvme-disc._tcp.local -- link: enp0s3

-- Information acquired via protocol mDNS/IPv4 in 1.2ms.
"""
# As systemd-resolved 257 (trixie) prints it, on an initiator VM of the suite.
RESOLVECTL_SERVICE = """\
storagetm-0123456789ab/_nvme-disc._tcp/local: storagetm-0123456789ab.local:8009 [priority=0, weight=0]
                                             169.254.1.2                        -- link: enp0s3
                                             fe80::5054:ff:fe00:1%2             -- link: enp0s3
                                             p=tcp
                                             NQN=nqn.2014-08.org.nvmexpress.discovery

-- Information acquired via protocol mDNS/IPv4 in 3.1ms.
"""
AVAHI = """\
+;enp0s3;IPv6;storagetm-0123456789ab;_nvme-disc._tcp;local
=;enp0s3;IPv6;storagetm-0123456789ab;_nvme-disc._tcp;local;storagetm-0123456789ab.local;fe80::5054:ff:fe00:1;8009;"NQN=nqn.2014-08.org.nvmexpress.discovery" "p=tcp"
=;enp0s3;IPv4;storagetm-0123456789ab;_nvme-disc._tcp;local;storagetm-0123456789ab.local;169.254.1.2;8009;"NQN=nqn.2014-08.org.nvmexpress.discovery" "p=tcp"
"""  # noqa: E501
FOUND = mdns.Announced("storagetm-0123456789ab", "storagetm-0123456789ab.local", 8009,
                       ("169.254.1.2", "fe80::5054:ff:fe00:1"))  # fmt: skip


def fake_tools(outputs: dict[str, str]) -> mdns.Runner:
    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        key = " ".join(argv[:2])
        return subprocess.CompletedProcess(argv, 0 if key in outputs else 1, outputs.get(key, ""), "")

    return runner


@pytest.mark.parametrize("heading", ["/_nvme-disc._tcp/local:", "._nvme-disc._tcp.local:"])
def test_targets_found_through_resolved(heading: str) -> None:
    service = RESOLVECTL_SERVICE.replace("/_nvme-disc._tcp/local:", heading)
    runner = fake_tools({"resolvectl query": RESOLVECTL_PTR, "resolvectl service": service})
    (found,) = mdns.browse(runner, lambda tool: "/usr/bin/" + tool)
    assert (found.name, found.host, found.port, set(found.addresses)) == (
        FOUND.name, FOUND.host, 8009, set(FOUND.addresses))  # fmt: skip
    assert found.txt["p"] == "tcp"


def test_targets_found_through_avahi_when_resolved_is_absent() -> None:
    runner = fake_tools({"avahi-browse -rpt": AVAHI})
    (found,) = mdns.browse(runner, lambda tool: None if tool == "resolvectl" else "/usr/bin/" + tool)
    assert (found.host, found.port, set(found.addresses)) == (FOUND.host, 8009, set(FOUND.addresses))


def test_an_avahi_record_with_a_port_that_is_no_number_is_skipped() -> None:
    bad = AVAHI.replace(";8009;", ";80x9;", 1)
    (found,) = mdns.parse_avahi(bad)
    assert (found.port, found.addresses) == (8009, ("169.254.1.2",))


def test_without_resolved_or_avahi_it_says_what_to_install() -> None:
    with pytest.raises(StorageTMError, match=r"neither systemd-resolved .* nor avahi ") as info:
        mdns.browse(fake_tools({}), lambda _tool: None)
    assert "install avahi-utils" in info.value.one_line()


FAKE_NVME = """#!/bin/sh
printf '%s\\n' "$*" >> "$NVME_CALLS"
case "$*" in
  *"-s 4420"*) cat "$NVME_PAGE_4420" ;;
  *) cat "$NVME_PAGE_8009" ;;
esac
"""


@pytest.fixture
def fake_nvme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvme"
    script.write_text(FAKE_NVME)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    for port, page in (("4420", DISCOVERY_4420), ("8009", DISCOVERY_8009)):
        (tmp_path / f"page{port}.json").write_text(json.dumps(page))
        monkeypatch.setenv(f"NVME_PAGE_{port}", str(tmp_path / f"page{port}.json"))
    calls = tmp_path / "calls"
    monkeypatch.setenv("NVME_CALLS", str(calls))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(fabrics, "require_nvme_tcp", lambda: None)
    return calls


def test_connect_with_a_code_keys_the_keyring_and_keeps_every_secret_off_argv(
    fake_nvme: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret, ctrl, key = generate_secret(), generate_secret(), generate_key()
    code = ConnectionCode(("169.254.1.2", "fe80::5054:ff:fe00:1"), 4420, HOST, secret, ctrl, key)
    from storagetm.security import tls

    keyed: list[tuple[str, str]] = []
    monkeypatch.setattr(tls, "ensure_handshake_daemon", lambda: None)
    monkeypatch.setattr(tls, "insert_key", lambda host, nqn, k: keyed.append((host, nqn)) if k == key else None)
    lines: list[tuple[Endpoint, str, Credentials]] = []

    def kernel_connect(endpoint: Endpoint, nqn: str, creds: Credentials) -> str:
        lines.append((endpoint, nqn, creds))
        return f"nvme{len(lines)}"

    monkeypatch.setattr(fabrics, "connect", kernel_connect)
    # DISK1 still has a controller reconnecting to a target that restarted: it is replaced.
    present = {DISK1: [("nvme9", "connecting")], DISK2: []}
    deleted: list[str] = []
    monkeypatch.setattr(fabrics, "controllers", lambda nqn: present[nqn])
    monkeypatch.setattr(fabrics, "delete_controller", deleted.append)
    monkeypatch.setattr(fabrics, "wait_namespaces", lambda nqns: [
        Namespace(nqn, f"/dev/nvme{i}n1", "QEMU", f"S{i}", 32 << 20, (f"nvme{i}",)) for i, nqn in enumerate(nqns, 1)])
    monkeypatch.setattr("sys.stdin", io.StringIO(encode(code) + "\n"))  # `connect -`: the code not on argv
    assert commands.run(["connect", "-"]) == 0
    out = capsys.readouterr().out
    assert f"/dev/nvme1n1  QEMU  S1  32.0 MiB  {DISK1}" in out and f"/dev/nvme2n1  QEMU  S2  32.0 MiB  {DISK2}" in out
    called = fake_nvme.read_text()
    assert "--tls" in called and f"--hostnqn={HOST}" in called
    assert secret not in called and ctrl not in called and key not in called
    assert keyed == [(HOST, "nqn.2014-08.org.nvmexpress.discovery"), (HOST, DISK1), (HOST, DISK2)]
    assert [(e.address, e.port, n, c.secret, c.ctrl_secret) for e, n, c in lines] == [
        ("169.254.1.2", 4420, DISK1, secret, ctrl), ("169.254.1.2", 4420, DISK2, secret, ctrl)]  # fmt: skip
    assert [c.controller for c in record.load()] == ["nvme1", "nvme2"]
    assert deleted == ["nvme9"]


def test_connect_leaves_a_live_disk_as_it_is(fake_nvme: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(fabrics, "controllers", lambda nqn: [("nvme1", "live")])
    monkeypatch.setattr(fabrics, "connect", lambda *_args: pytest.fail("connected again"))
    monkeypatch.setattr(fabrics, "wait_namespaces", lambda nqns: [
        Namespace(nqn, f"/dev/nvme{i}n1", "QEMU", f"S{i}", 1 << 20, (f"nvme{i}",)) for i, nqn in enumerate(nqns, 1)])
    assert commands.run(["connect", "169.254.1.2", "--disk", "virt0001"]) == 0
    assert capsys.readouterr().out.strip() == f"/dev/nvme1n1  QEMU  S1  1.0 MiB  {DISK1}"


def test_disconnect_takes_only_what_connect_connected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    record.save([record.Connection("nvme1", DISK1, "t.local", "169.254.1.2"),
                 record.Connection("nvme2", DISK2, "t.local", "169.254.1.2")])  # fmt: skip
    current = {"nvme1": DISK1, "nvme2": "nqn.someone-else"}  # nvme2's name now belongs to another controller
    deleted: list[str] = []
    monkeypatch.setattr(fabrics, "controller_nqn", lambda name: current.get(name, ""))
    monkeypatch.setattr(fabrics, "delete_controller", deleted.append)
    assert commands.run(["disconnect"]) == 0
    assert deleted == ["nvme1"]
    assert record.load() == []


def test_decode_takes_the_code_from_stdin_or_a_file_off_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from storagetm import connection

    secret = generate_secret()
    text = encode(ConnectionCode(("192.0.2.1",), 4420, "nqn.2014-08.org.nvmexpress:uuid:1", secret))
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))
    assert commands.run(["decode", "--show-secrets", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["secret"] == secret
    (tmp_path / "code").write_text(text + "\n")
    assert commands.run(["decode", f"@{tmp_path / 'code'}"]) == 0
    assert json.loads(capsys.readouterr().out)["addresses"] == ["192.0.2.1"]
    state = RunState(pid=1, ports=[Listener("ipv6", "::", 4420)], addresses=[Address("ipv4", "192.0.2.5", "e", False)])
    assert connection.screen_lines(state)[0].endswith("storagetm connect -, then type CODE:")


def test_a_wrong_code_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from storagetm.cli import main

    text = encode(ConnectionCode(("192.0.2.1",), 4420))
    assert main(["decode", text[:8] + ("Q" if text[8] != "Q" else "R") + text[9:]]) == 2
    err = capsys.readouterr().err
    assert "storagetm: connection code: checksum wrong — a character was mistyped" in err


def test_copy_names_a_disk_by_device_nqn_or_serial() -> None:
    disks = [Namespace(DISK1, "/dev/nvme1n1", "QEMU", "VIRT0001", 1, ("nvme1",)),
             Namespace(DISK2, "/dev/nvme2n1", "QEMU", "NVME0001", 1, ("nvme2",))]  # fmt: skip
    assert commands.resolve_disk("/dev/nvme2n1", disks) is disks[1]
    assert commands.resolve_disk("nvme1n1", disks) is disks[0]
    assert commands.resolve_disk(DISK2, disks) is disks[1]
    assert commands.resolve_disk("VIRT0001", disks) is disks[0]
    with pytest.raises(UsageError, match="names several disks"):
        commands.resolve_disk("qemu", disks)
    with pytest.raises(UsageError, match="no connected NVMe-oF disk"):
        commands.resolve_disk("/dev/sda", disks)


def test_targets_with_a_code_lists_the_disks_from_the_discovery_log(
    fake_nvme: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fabrics, "connected", lambda: [Namespace(DISK2, "/dev/nvme4n1", "QEMU NVMe Ctrl", "NVME0001",
                                                                 32 << 20, ("nvme4",))])  # fmt: skip
    assert commands.run(["targets", encode(ConnectionCode(("169.254.1.2",), 4420))]) == 0
    out = capsys.readouterr().out
    assert "169.254.1.2  port 4420  TLS" in out
    assert f"  {DISK1}\n    qemu-harddisk-virt0001 (model, serial and size once connected" in out
    assert f"  {DISK2}\n    connected: /dev/nvme4n1  QEMU NVMe Ctrl  NVME0001  32.0 MiB" in out
    assert "mode (read-write, read-only, snapshot): shown on the target's screen" in out


def test_copy_all_copies_every_connected_storagetm_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    disks = []
    for i, nqn in enumerate((DISK1, DISK2), 1):
        path = tmp_path / f"nvme{i}n1"
        path.write_bytes(os.urandom(1 << 20) * 3)
        disks.append(Namespace(nqn, str(path), "QEMU", f"S{i}", 3 << 20, (f"nvme{i}",)))
    monkeypatch.setattr(fabrics, "connected", lambda: disks)
    into = tmp_path / "copies"
    into.mkdir()
    assert commands.run(["copy", "--all", str(into)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{disks[0].device} -> {into}/qemu-harddisk-virt0001.img: identical",
                     f"{disks[1].device} -> {into}/qemu-nvme-ctrl-nvme0001.img: identical"]  # fmt: skip
    assert (into / "qemu-nvme-ctrl-nvme0001.img").read_bytes() == Path(disks[1].device).read_bytes()
    with pytest.raises(UsageError, match="give DISK DEST, or --all DIR"):
        commands.run(["copy", "/dev/nvme1n1"])


def test_a_name_with_a_comma_cannot_add_options_to_the_connect_line() -> None:
    """The kernel splits the line at commas and a later option wins: a subsystem NQN from
    the discovery log (or an mDNS name) must not redirect the connection elsewhere."""
    sneaky = f"{DISK1},traddr=192.0.2.66,trsvcid=4420"
    with pytest.raises(fabrics.FabricsError, match="cannot be passed to the kernel"):
        fabrics.connect_options(Endpoint("169.254.1.2", 4420), sneaky, Credentials(HOST))
    with pytest.raises(fabrics.FabricsError, match="cannot be passed to the kernel"):
        fabrics.connect_options(Endpoint("169.254.1.2", 4420, "eth0,tls"), DISK1, Credentials(HOST))
