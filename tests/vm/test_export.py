"""End to end: discovery with nvme-cli defaults, every disk once with its model and serial,
every byte read back, writes reaching the disk file, and a clean teardown."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from testbed.capture import capture, marker, read_remote, write_marker
from testbed.initiator import CONNECT_ALL, connected, disconnect_all, screen_addresses, wait_address
from testbed.machine import Disk, make_disk, sha256_file
from testbed.pair import BOOT_TIMEOUT, Pair
from testbed.wait import until

pytestmark = pytest.mark.vm

RESOLVECTL = "SYSTEMD_COLORS=0 resolvectl --no-pager"


def target_ready(pair: Pair, count: int) -> None:
    pair.target.wait_for(rf"Exported disks \({count}\)", BOOT_TIMEOUT)


def test_screen_shows_usable_addresses(pair: Pair) -> None:
    target_ready(pair, 4)
    # IPv6 link-local comes first; IPv4 link-local (169.254/16) follows after ARP probing.
    wait_address(pair.target, "169.254.")
    wait_address(pair.target, "fe80::")
    addresses = screen_addresses(pair.target)
    assert any(a.startswith("fe80::") and "%enp0s3 -f enp0s3" in a for a in addresses), addresses
    assert any(a.startswith("169.254.") for a in addresses), addresses


@pytest.mark.parametrize("family", ["ipv6-link-local", "ipv4-link-local"])
def test_connect_all_with_defaults_reads_every_byte(pair: Pair, family: str) -> None:
    target_ready(pair, 4)
    prefix = "fe80::" if family.startswith("ipv6") else "169.254."
    address = wait_address(pair.target, prefix)
    disconnect_all(pair.initiator)
    # Port 8009 serves discovery only: its log refers to the I/O port's discovery service,
    # at the very address the initiator asked (8009 listens on each address by itself).
    referral = pair.initiator.sh(f"nvme discover -t tcp -a {address}")
    assert "subtype: nvme subsystem" not in referral, referral
    assert re.search(r"subtype:\s+(discovery subsystem )?referral", referral), referral
    assert re.search(r"trsvcid:\s+4420", referral), referral
    asked = address.split()[0].partition("%")[0]
    # The entries: 8009 itself (as the target bound it, with its own zone), and the referral.
    assert [t.partition("%")[0] for t in re.findall(r"traddr:\s+(\S+)", referral)] == [asked, asked], referral
    assert re.search(rf"referral\n(.*\n)*?traddr:\s+{re.escape(asked)}\n", referral), referral  # no zone
    discover = pair.initiator.sh(f"nvme discover -t tcp -a {address} -s 4420")
    nqns = set(re.findall(r"subnqn:\s+(\S+)", discover)) - {"nqn.2014-08.org.nvmexpress.discovery"}
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    remotes = connected(pair.initiator)
    try:
        # connect-all followed the referral: every I/O controller is on 4420, none on 8009.
        ports = set(re.findall(r"trsvcid=(\d+)", pair.initiator.sh("cat /sys/class/nvme/nvme*/address")))
        assert ports == {"4420"}, ports
        # Every disk exactly once, with the disk's own model and serial.
        assert sorted(r.serial for r in remotes) == sorted(pair.disks), remotes
        assert {r.nqn for r in remotes} == nqns
        sata = next(r for r in remotes if r.serial == "SATA0001")
        assert sata.model == "STM SATA DISK"
        for remote in remotes:
            out = pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300)
            # The file as it is now: other tests of this module resize and write some disks.
            assert out.split()[0] == pair.sum_now(remote.serial), remote
    finally:
        disconnect_all(pair.initiator)


def test_discovery_service_is_found_over_mdns(pair: Pair) -> None:
    """A standard DNS-SD browser (systemd-resolved's) on the initiator finds _nvme-disc._tcp,
    and connect-all to the announced host and port connects every disk."""
    target_ready(pair, 4)
    announced = json.loads(pair.target.sh("storagetm status --json"))["announced"]
    assert re.fullmatch(r"storagetm-[0-9a-f]{12}\.local", announced), announced
    assert pair.target.sh("hostname") == announced.removesuffix(".local")
    browse = ""

    def browsed() -> re.Match[str] | None:
        nonlocal browse
        browse, rc = pair.initiator.run(f"{RESOLVECTL} query -p mdns --type=PTR _nvme-disc._tcp.local", 30)
        return re.search(r"IN PTR (\S+)\._nvme-disc\._tcp\.local", browse) if rc == 0 else None

    # The responder probes for its names for a few seconds after (re)starting.
    instance = until(browsed, 60, lambda: browse, pause=2)
    assert instance.group(1) == announced.removesuffix(".local")
    service = pair.initiator.sh(f"{RESOLVECTL} service {instance.group(1)} _nvme-disc._tcp local")
    host, port = re.search(r": (\S+\.local):(\d+) ", service).groups()  # type: ignore[union-attr]
    assert (host, port) == (announced, "8009"), service
    assert "p=tcp" in service and "NQN=nqn.2014-08.org.nvmexpress.discovery" in service, service
    found = re.search(r"(fe80::\S+)%\d+ .*link: (\S+)", service) or re.search(r"(169\.254\.\S+) ", service)
    assert found, service
    address = f"{found.group(1)}%{found.group(2)} -f {found.group(2)}" if found.lastindex == 2 else found.group(1)
    disconnect_all(pair.initiator)
    try:
        pair.initiator.sh(f"{CONNECT_ALL} -a {address} -s {port}")
        assert sorted(r.serial for r in connected(pair.initiator)) == sorted(pair.disks)
    finally:
        disconnect_all(pair.initiator)


def test_status_json_and_configfs_agree(pair: Pair) -> None:
    target_ready(pair, 4)
    status = json.loads(pair.target.sh("storagetm status --json"))
    serials = sorted(e["disk"]["serial"] for e in status["exports"])
    assert serials == sorted(pair.disks)
    configfs = pair.target.sh("ls /sys/kernel/config/nvmet/subsystems").split()
    anchors = [nqn for nqn in configfs if nqn.endswith(":discovery-port")]  # makes 8009 listen; no host may use it
    assert len(anchors) == 1, configfs
    assert sorted(set(configfs) - set(anchors)) == sorted(e["nqn"] for e in status["exports"])
    # One discovery port on each address (link-local IPv6 bound with its zone), each holding
    # only the anchor.
    discovery = pair.target.sh("cd /sys/kernel/config/nvmet/ports; for p in *; do "
                               '[ "$(cat $p/addr_trsvcid)" = 8009 ] && echo $(cat $p/addr_traddr) $(ls $p/subsystems); '
                               "done; true").splitlines()  # fmt: skip
    assert sorted(line.split()[0] for line in discovery) == sorted(
        p["traddr"] for p in status["ports"] if p["trsvcid"] == 8009), (discovery, status["ports"])  # fmt: skip
    assert {line.split()[1:] == anchors for line in discovery} == {True}, discovery
    assert any(line.startswith("169.254.") for line in discovery), discovery
    assert any(line.startswith("fe80::") and "%enp0s3 " in line for line in discovery), discovery
    assert sorted(pair.target.sh("ls /sys/kernel/config/nvmet/ports/4420/subsystems").split()) == sorted(configfs)
    ports = {p["trsvcid"] for p in status["ports"]}
    assert ports == {4420, 8009}
    listening = pair.target.sh("ss -Htln")
    assert ":4420" in listening and ":8009" in listening


def test_service_is_ready_once_the_boot_disks_are_exported(pair: Pair) -> None:
    """READY=1 waits until udev's queue is empty, so `Started storagetm.service` comes after the
    exports of the disks udev has processed by then, and resolved (ordered after storagetm)
    starts only then. A USB disk may come later: usb-storage scans it a second after the
    device appears (its delay_use), when udev's queue may already have been empty."""
    target_ready(pair, 4)
    journal = pair.target.sh("journalctl -b --no-pager _SYSTEMD_UNIT=storagetm.service + _PID=1")
    lines = journal.splitlines()
    started = next(i for i, line in enumerate(lines) if "Started storagetm.service" in line)
    resolved = next(i for i, line in enumerate(lines) if "Starting systemd-resolved.service" in line)
    pattern = re.compile(r"storagetm\[\d+\]: exported \S+ \(.*\) as \S+\.(\S+)$")
    # The boot disks only: a disk another test hot-plugs is exported in this boot too.
    exported = {m.group(1): i for i, line in enumerate(lines) if (m := pattern.search(line))
                and any(serial.lower() in m.group(1) for serial in pair.disks)}  # fmt: skip
    early = {serial: i for serial, i in exported.items() if "usb" not in serial}
    assert len(exported) == 4 and len(early) == 3, journal
    assert max(early.values()) < started < resolved, "\n".join(lines[-40:])


def test_size_change_reaches_the_initiator(pair: Pair) -> None:
    target_ready(pair, 4)
    address = wait_address(pair.target, "169.254.")
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "VIRT0001")

        def size() -> int:
            return int(pair.initiator.sh(f"blockdev --getsize64 /dev/{remote.block}"))

        assert size() == 32 << 20
        pair.target.qmp.cmd("block_resize", **{"node-name": pair.disks["VIRT0001"].node, "size": 48 << 20})
        until(lambda: size() == 48 << 20, 60, "the initiator did not see the new size")
        assert "changed size" in pair.target.sh("journalctl -b -u storagetm --no-pager")
    finally:
        disconnect_all(pair.initiator)


def test_image_carries_the_promised_drivers(pair: Pair) -> None:
    modules = ("nvmet nvmet_tcp nvme_tcp virtio_net e1000e igb igc r8169 tg3 atlantic ixgbe i40e "
               "cdc_ether cdc_ncm r8152 ax88179_178a thunderbolt_net nvme ahci ata_piix virtio_blk "
               "virtio_scsi sd_mod usb_storage uas sdhci_pci sdhci_acpi mmc_block megaraid_sas mpt3sas "
               "smartpqi dm_snapshot zram")  # fmt: skip
    out, rc = pair.target.run(f"for m in {modules}; do modinfo -n $m >/dev/null 2>&1 || echo MISSING $m; done")
    assert rc == 0 and "MISSING" not in out, out
    assert pair.target.sh("ls /usr/lib/firmware/rtl_nic/ | head -1").startswith("rtl")


def test_dashboard_and_status_follow_a_copy(pair: Pair) -> None:
    """During a copy the counters in `storagetm status --json` advance, the initiator is
    listed, and tty1 shows the dashboard (a screenshot is kept in the logs)."""
    target_ready(pair, 4)
    address = wait_address(pair.target, "169.254.")
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "NVME0001")
        nqn = next(e["nqn"] for e in json.loads(pair.target.sh("storagetm status --json"))["exports"]
                   if e["disk"]["serial"] == "NVME0001")  # fmt: skip

        def read_so_far() -> int:
            status = json.loads(pair.target.sh("storagetm status --json"))
            return int(next(e for e in status["exports"] if e["nqn"] == nqn)["activity"]["read_bytes"])

        before = read_so_far()
        # Copies over and over in the background, so the samples below fall within one
        # however fast this machine is today; stopped once the checks are done.
        copy = f"dd if=/dev/{remote.block} of=/dev/null bs=64k iflag=direct"
        pair.initiator.sh(f"(for i in $(seq 30); do {copy}; done) >/dev/null 2>&1 & echo $! > /tmp/copy.pid")
        samples = [before]

        def advanced() -> bool:
            samples.append(read_so_far())
            return len(set(samples)) >= 3

        time.sleep(1.5)
        until(advanced, 60, lambda: f"the read counter did not advance: {samples}", pause=1.5)
        assert samples == sorted(samples), samples
        status = json.loads(pair.target.sh("storagetm status --json"))
        assert any(peer.startswith("169.254.") for peer in status["initiators"]), status["initiators"]
        ppm = pair.target.workdir / "dashboard.ppm"
        pair.target.qmp.cmd("screendump", filename=str(ppm))
        png = ppm.with_suffix(".png")
        subprocess.run(["convert", str(ppm), str(png)], check=True)
        assert png.stat().st_size > 2000
        assert "% read" in pair.target.console()
    finally:
        pair.initiator.run("kill $(cat /tmp/copy.pid); pkill -x dd; wait", timeout=60)
        disconnect_all(pair.initiator)


HOTPLUG_BOUND = 30  # seconds from QMP device_add until the disk is in the discovery log


def test_disk_events_are_served_at_realtime_priority(pair: Pair) -> None:
    """Once started (`--realtime` in the unit), storagetm runs SCHED_RR at priority 1, and
    what it spawns (dmsetup, losetup) does not inherit that."""
    target_ready(pair, 4)
    pid = pair.target.sh("systemctl show -P MainPID storagetm.service")
    stat = pair.target.sh(f"cat /proc/{pid}/stat").rsplit(")", 1)[1].split()
    rt_priority, policy = stat[37], stat[38]  # fields 40 and 41 of proc_pid_stat(5)
    assert (policy, rt_priority) == ("2", "1"), stat
    assert "SCHED_RESET_ON_FORK" in pair.target.sh(f"chrt -p {pid}")


def test_hotplug_add_and_remove(pair: Pair) -> None:
    target_ready(pair, 4)
    address = wait_address(pair.target, "169.254.")
    hot = Disk(pair.disks["VIRT0001"].path.parent / "HOT00001.img", "virtio", "HOT00001")
    make_disk(hot.path, 16 << 20, b"HOT00001")

    def discoverable() -> bool:
        return "hot00001" in pair.initiator.sh(f"nvme discover -t tcp -a {address} -s 4420")

    pair.target.hotplug(hot)
    until(discoverable, HOTPLUG_BOUND, "hot-plugged disk not discoverable in time")
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        expected = sorted([*pair.disks, "HOT00001"])
        # A namespace appears once the kernel's scan of its new controller is done.
        serials: list[str] = []

        def all_there() -> bool:
            nonlocal serials
            serials = sorted(r.serial for r in connected(pair.initiator))
            return serials == expected

        until(all_there, 30, lambda: f"connected {serials}, not {expected}")
        # Pull it while connected: it disappears, the others keep working.
        since = len(pair.target.console())
        pair.target.unplug(hot)
        pair.target.wait_for(r"Exported disks \(4\)", 60, since=since)
        until(lambda: not discoverable(), 60, "removed disk still in the discovery log")
        remote = next(r for r in connected(pair.initiator) if r.serial == "NVME0001")
        out = pair.initiator.sh(f"sha256sum /dev/{remote.block}", timeout=300)
        assert out.split()[0] == pair.sums["NVME0001"]
    finally:
        disconnect_all(pair.initiator)


def test_plain_link_carries_the_data_in_clear(pair: Pair) -> None:
    """The control for the TLS test (test_tls.py): without TLS, a capture of the link taken
    while the initiator reads a disk holds the disk's bytes, so the check there can fail."""
    target_ready(pair, 4)
    address = wait_address(pair.target, "169.254.")
    disconnect_all(pair.initiator)
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    try:
        remote = next(r for r in connected(pair.initiator) if r.serial == "USB00001")
        text = marker()
        write_marker(pair.initiator, remote, text)
        with capture(pair.target, "plain-read") as pcap:
            assert read_remote(pair.initiator, remote).decode() == text.decode().rstrip("|")
        assert text in pcap.read_bytes()
    finally:
        disconnect_all(pair.initiator)


def test_write_reaches_disk_and_shutdown_leaves_nothing(pair: Pair) -> None:
    """Stops storagetm and powers the target off: a test after it gets the target booted
    again (the `pair` fixture), so it comes last in this module to save that boot."""
    target_ready(pair, 4)
    address = wait_address(pair.target, "fe80::")
    pair.initiator.sh(f"{CONNECT_ALL} -a {address}")
    remote = next(r for r in connected(pair.initiator) if r.serial == "VIRT0001")
    pattern = "storagetm-write-through-" * 1000
    dd = f"dd if=/tmp/pattern of=/dev/{remote.block} bs=4096 seek=100 oflag=direct conv=fsync"
    pair.initiator.sh(f"printf '%s' '{pattern[:4096]}' > /tmp/pattern; {dd}")
    disconnect_all(pair.initiator)
    pair.target.sh("storagetm stop")
    assert pair.target.sh("ls -A /sys/kernel/config/nvmet/subsystems /sys/kernel/config/nvmet/ports").split() == [
        "/sys/kernel/config/nvmet/ports:",
        "/sys/kernel/config/nvmet/subsystems:",
    ]
    pair.target.stop()
    data = pair.disks["VIRT0001"].path.read_bytes()
    assert data[100 * 4096 : 101 * 4096] == pattern[:4096].encode()
    assert sha256_file(pair.disks["NVME0001"].path) == pair.sums["NVME0001"]
