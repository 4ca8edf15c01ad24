"""storagetm beside systemd-storagetm, measured in one run on the same image and VMs.

    python3 -m bench.compare [--size-mib 128] [--rounds 2]

One initiator VM stays up; for each implementation a target VM boots from the same UKI
(systemd-storagetm: `systemd.mask=storagetm.service systemd.wants=systemd-storagetm.service`)
and the bench measures, from the host:

- ready: QEMU start until the initiator's `nvme discover` lists a subsystem;
- hotplug: QMP device_add until the new disk is in the discovery log;
- export time for 1, 8 and 32 disks (regular files, the daemon started by hand in the
  target, until every subsystem is linked into a port);
- sequential read and write over the link (dd, O_DIRECT, MiB/s);
- the daemon's CPU time and resident memory after the copies.

Writes bench/results/compare.json, compare.md and compare.png, and puts the table into
README's performance section.
NBD is not measured: the image carries no NBD server (see the closing note of issue 8).
Not part of CI: slow, and this machine is shared and noisy."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm.conftest import BOOT_TIMEOUT, TARGET_APPEND, image, initiator_vm, prepare_initiator
from tests.vm.initiator import connected, disconnect_all
from tests.vm.machine import VM, Disk, make_disk

TARGET_LL = "fe80::5054:ff:fe00:1%enp0s3"  # the target's EUI-64 link-local address (MAC below)
IMPLEMENTATIONS = {
    "storagetm": {"append": TARGET_APPEND, "unit": "storagetm.service", "run": "storagetm {files} >/dev/null 2>&1"},
    "systemd-storagetm": {
        "append": f"{TARGET_APPEND} systemd.mask=storagetm.service " "systemd.wants=systemd-storagetm.service",
        "unit": "systemd-storagetm.service",
        "run": "/usr/lib/systemd/systemd-storagetm {files} >/dev/null 2>&1 </dev/null",
    },
}
EXPORT_COUNTS = (1, 8, 32)
RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("<!-- bench.compare: begin -->", "<!-- bench.compare: end -->")


def update_readme(table: str, readme: Path = README) -> None:
    """Put the table of this run between the markers in README's performance section."""
    text = readme.read_text()
    begin, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if begin < 0 or end < begin:
        return
    readme.write_text(text[: begin + len(MARKERS[0])] + "\n" + table + text[end:])


def discovery_ports(target: VM) -> list[str]:
    """The TCP ports listening for NVMe/TCP on IPv6, as configfs has them."""
    out = target.sh(
        "for p in /sys/kernel/config/nvmet/ports/*; do "
        '[ "$(cat $p/addr_adrfam)" = ipv6 ] && ls $p/subsystems | grep -q . && cat $p/addr_trsvcid; done; true'
    )
    return sorted(set(out.split()))


def subsystems_seen(initiator: VM, port: str) -> int:
    out, rc = initiator.run(f"nvme discover -t tcp -a {TARGET_LL} -f enp0s3 -s {port}", 20)
    return out.count("subtype: nvme subsystem") if rc == 0 else 0


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def dd_mib_s(initiator: VM, command: str) -> float:
    out = initiator.sh(f"{command} 2>&1 | tail -n 1", timeout=900)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not match:
        raise RuntimeError(f"unexpected dd output: {out}")
    return int(match.group(1)) / float(match.group(2)) / (1 << 20)


def export_seconds(target: VM, run: str, count: int) -> float:
    """Start the daemon by hand on `count` regular files; time until all are linked to a port."""
    files = " ".join(f"/tmp/bench/f{i}.img" for i in range(count))
    script = (
        f"rm -rf /tmp/bench; mkdir -p /tmp/bench; for i in $(seq 0 {count - 1}); do "
        f"truncate -s 1M /tmp/bench/f$i.img; done; "
        f"start=$(date +%s.%N); {run.format(files=files)} & pid=$!; "
        f"until [ $(ls /sys/kernel/config/nvmet/ports/*/subsystems 2>/dev/null | grep nqn | sort -u | wc -l) "
        f"-ge {count} ]; do sleep 0.02; done; end=$(date +%s.%N); kill $pid; wait $pid; "
        'awk -v s="$start" -v e="$end" \'BEGIN { printf "elapsed %.3f\\n", e - s }\''
    )
    out = target.sh(script, timeout=300)
    return float(out.split("elapsed")[-1].split()[0])


def measure(
    name: str, spec: dict[str, str], initiator: VM, workdir: Path, size_mib: int, rounds: int
) -> dict[str, object]:
    disk = Disk(workdir / f"{name}-BENCH001.img", "virtio", "BENCH001")
    make_disk(disk.path, size_mib << 20, b"BENCH001")
    target = VM(
        "target",
        workdir / name,
        kernel=image("storagetm.efi"),
        append=spec["append"],
        disks=[disk],
        link_socket=workdir / "link.sock",
        link_server=False,
        mac="52:54:00:00:00:01",
    )
    result: dict[str, object] = {}
    started = time.monotonic()
    target.start()
    try:
        ports: list[str] = []

        def discoverable() -> bool:
            nonlocal ports
            ports = ports or (["8009"] if name == "storagetm" else [])
            if not ports:
                found = re.search(r"Listening on ipv6 \(port (\d+)\)", target.console())
                ports = [found.group(1)] if found else []
            return bool(ports) and subsystems_seen(initiator, ports[0]) >= 1

        until(discoverable, BOOT_TIMEOUT, f"{name}: first disk connectable")
        result["ready_s"] = time.monotonic() - started
        target.wait_shell(60)
        port = ports[0]

        qmp = target.qmp
        hot = workdir / f"{name}-HOT.img"
        make_disk(hot, 16 << 20, b"HOT00001")
        qmp.cmd("blockdev-add", driver="file", filename=str(hot), **{"node-name": "hotfile"})
        qmp.cmd("blockdev-add", driver="raw", file="hotfile", **{"node-name": "hot"})
        plugged = time.monotonic()
        qmp.cmd("device_add", driver="virtio-blk-pci", bus="hp0", drive="hot", serial="HOT00001", id="hotdisk")
        until(lambda: subsystems_seen(initiator, port) >= 2, 120, f"{name}: hot-plugged disk discoverable")
        result["hotplug_s"] = time.monotonic() - plugged

        disconnect_all(initiator)
        initiator.sh(f"nvme connect-all -t tcp -a {TARGET_LL} -f enp0s3 -s {port}")
        # The bench disk by its size: systemd-storagetm does not pass the disk's serial on.
        sizes = {r.block: int(initiator.sh(f"cat /sys/block/{r.block}/size")) * 512 for r in connected(initiator)}
        remote_block = next(block for block, size in sizes.items() if size == size_mib << 20)
        dev = f"/dev/{remote_block}"
        reads = [
            dd_mib_s(initiator, f"dd if={dev} of=/dev/null bs=1M count={size_mib} iflag=direct") for _ in range(rounds)
        ]
        writes = [
            dd_mib_s(initiator, f"dd if=/dev/zero of={dev} bs=1M count={size_mib} oflag=direct") for _ in range(rounds)
        ]
        disconnect_all(initiator)
        result["read_mib_s"] = statistics.median(reads)
        result["write_mib_s"] = statistics.median(writes)
        pid = target.sh(f"systemctl show -p MainPID --value {spec['unit']}")
        ticks = target.sh(f"cut -d' ' -f14,15 /proc/{pid}/stat")
        hz = int(target.sh("getconf CLK_TCK"))
        result["daemon_cpu_s"] = sum(int(t) for t in ticks.split()) / hz
        result["daemon_rss_mib"] = int(target.sh(f"awk '/^VmRSS/ {{print $2}}' /proc/{pid}/status")) / 1024

        # Export cost: the service stopped (systemd-storagetm's unit reboots when it exits,
        # hence the mask), then the daemon run by hand on 1, 8, 32 files.
        target.sh(
            "systemctl mask --runtime reboot.target; "  # systemd-storagetm's unit reboots when it dies
            f"systemctl stop {spec['unit']}; "
            "cd /sys/kernel/config/nvmet && for p in ports/*; do rm -f $p/subsystems/*; rmdir $p; done; "
            "for s in subsystems/*; do echo 0 > $s/namespaces/1/enable; rmdir $s/namespaces/1; rmdir $s; done; "
            "true",
            timeout=120,
        )
        result["export_s"] = {str(n): export_seconds(target, spec["run"], n) for n in EXPORT_COUNTS}
    finally:
        target.stop()
    return result


def markdown(results: dict[str, dict[str, object]], meta: dict[str, str]) -> str:
    ours, theirs = results["storagetm"], results["systemd-storagetm"]
    rows = [
        ("boot → first disk connectable (s)", "ready_s"),
        ("hotplug → in discovery log (s)", "hotplug_s"),
        ("sequential read (MiB/s)", "read_mib_s"),
        ("sequential write (MiB/s)", "write_mib_s"),
        ("daemon CPU time after the copies (s)", "daemon_cpu_s"),
        ("daemon resident memory (MiB)", "daemon_rss_mib"),
    ]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} (QEMU TCG, one vCPU per VM), one run.",
        "",
        "| | storagetm | systemd-storagetm | ratio |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        a, b = float(ours[key]), float(theirs[key])  # type: ignore[arg-type]
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    for n in EXPORT_COUNTS:
        a = float(ours["export_s"][str(n)])  # type: ignore[index]
        b = float(theirs["export_s"][str(n)])  # type: ignore[index]
        lines.append(f"| export {n} disk{'s' if n > 1 else ''} (s) | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    return "\n".join(lines) + "\n"


def ratios(results: dict[str, dict[str, object]]) -> list[tuple[str, float]]:
    ours, theirs = results["storagetm"], results["systemd-storagetm"]
    keys = ["ready_s", "hotplug_s", "read_mib_s", "write_mib_s", "daemon_cpu_s", "daemon_rss_mib"]
    pairs = [(k, float(ours[k]) / float(theirs[k])) for k in keys]  # type: ignore[arg-type]
    for n in EXPORT_COUNTS:
        a = float(ours["export_s"][str(n)])  # type: ignore[index]
        b = float(theirs["export_s"][str(n)])  # type: ignore[index]
        pairs.append((f"export_{n}_s", a / b))
    return pairs


def chart(results: dict[str, dict[str, object]], path: Path) -> None:
    """Ratios storagetm / systemd-storagetm as bars, drawn by ImageMagick; the line marks 1."""
    rows = ratios(results)
    bar, scale, left = 30, 150, 170
    height = 50 + bar * len(rows)
    draw = [f"line {left + scale},35 {left + scale},{height - 10}"]
    for i, (key, ratio) in enumerate(rows):
        y = 40 + i * bar
        length = min(ratio, 3.0) * scale
        draw.append(f"text 10,{y + 15} '{key}'")
        draw.append(f"rectangle {left},{y} {left + length:.0f},{y + bar - 10}")
        draw.append(f"text {left + length + 6:.0f},{y + 15} '{ratio:.2f}'")
    subprocess.run(
        [
            "convert",
            "-size",
            f"{left + 3 * scale + 80}x{height}",
            "xc:white",
            "-font",
            "DejaVu-Sans",
            "-pointsize",
            "13",
            "-fill",
            "black",
            "-draw",
            "text 10,20 'storagetm / systemd-storagetm (bench.compare)'",
            "-fill",
            "steelblue",
            "-stroke",
            "none",
            "-draw",
            " ".join(draw),
            str(path),
        ],
        check=True,
    )


def report(data: dict[str, object]) -> str:
    """compare.md, compare.png and README's table from one run's JSON."""
    results: dict[str, dict[str, object]] = data["results"]  # type: ignore[assignment]
    table = markdown(results, data["meta"])  # type: ignore[arg-type]
    (RESULTS / "compare.md").write_text(table)
    chart(results, RESULTS / "compare.png")
    update_readme(table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="redo table, chart and README from the last JSON")
    args = parser.parse_args()
    if args.report_only:
        print(report(json.loads((RESULTS / "compare.json").read_text())))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-compare-"))
    link = workdir / "link.sock"
    initiator = initiator_vm(workdir, link)
    initiator.start()
    try:
        initiator.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(initiator)
        results = {
            name: measure(name, spec, initiator, workdir, args.size_mib, args.rounds)
            for name, spec in IMPLEMENTATIONS.items()
        }
    finally:
        initiator.stop()
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{subprocess.getoutput('nproc')} cores, "
        f"{subprocess.getoutput('uname -m')}, QEMU {subprocess.getoutput('qemu-system-x86_64 --version').split()[3]}",
    }
    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "size_mib": args.size_mib, "rounds": args.rounds, "results": results}
    (RESULTS / "compare.json").write_text(json.dumps(data, indent=1))
    print(report(data))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
