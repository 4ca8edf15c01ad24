"""storagetm beside systemd-storagetm and NBD, measured in one run on the same image and VMs.

    ci/build-image.sh bench && python3 -m bench.compare [--size-mib 128] [--boots 5] [--runs 2]

Everything runs on the bench image (`mkosi.profiles/bench`: the shipped image plus
nbd-server and nbd-client). One initiator VM stays up; target VMs boot from the same UKI,
`--boots` times for each implementation, the implementations taking turns (in alternating
order) so that drift of this shared machine hits all alike. Every boot samples, from the host:

- ready: QEMU start until the initiator sees the disk offered (`nvme discover` lists a
  subsystem; for NBD, `nbd-client -l` lists the export);
- hotplug (`--hotplugs` per boot): QMP device_add until the initiator is told the
  discovery log changed (its persistent discovery controller gets the asynchronous event;
  the log is then read to check the disk is in it); NBD has no hotplug;
- sequential read and write over the link (dd, O_DIRECT, MiB/s, `--rounds` each), and for
  storagetm also read in read-only and snapshot mode;
- the daemon's CPU time and resident memory after the copies (NBD: nbd-server and its
  per-connection child, still connected).

Each figure is the median of all its samples. The last boot also measures, once, the export
time for 1, 8 and 32 disks (regular files, the daemon started by hand in the target, until
every disk is linked into a port; NBD: until it listens); for storagetm also while its
service runs, when the command hands the files to it (control socket).

Each run is saved as bench/results/compare-<start>.json. The report (bench/compare_report.py:
compare.md, compare.png, README's performance section) shows the latest `--runs` runs side by
side, every figure with its spread over the boots, and the goals checked in each run. Not
part of CI: slow, and this machine is shared and noisy."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare_report import EXPORT_COUNTS, ROWS, baseline_report, report
from bench.summary import RESULTS
from storagetm.model import DISCOVERY_NQN, IO_TRSVCID
from testbed.initiator import connected, disconnect_all
from testbed.machine import VM, Disk, make_disk, qemu_binary, qemu_cpu
from testbed.pair import BOOT_TIMEOUT, TARGET_APPEND, image, running_initiator, target_vm
from testbed.wait import until

BENCH_IMAGE = "storagetm-bench.efi"
BASELINE = "storagetm-baseline"  # storagetm of the --baseline image
TARGET_LL = "fe80::5054:ff:fe00:1%enp0s3"  # the target's EUI-64 link-local address (MAC below)
NBD_PORT = 10809
README = Path(__file__).resolve().parents[1] / "README.md"
AEN_FIFO = "/tmp/bench-aen"
# The initiator's kernel turns a discovery-log-change AEN into a uevent with NVME_AEN=0x70f002
# (nvme-cli's autoconnect rule acts on the same); this writes a line into AEN_FIFO for each.
AEN_WAITER = f"""import os, socket
s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
s.bind((0, 1))
out = os.open("{AEN_FIFO}", os.O_WRONLY)
os.write(out, b"ready\\n")
while True:
    if b"NVME_AEN=0x70f002" in s.recv(65536).split(b"\\0"):
        os.write(out, b"aen\\n")
"""
AUTOCONNECT_MASK = "/run/udev/rules.d/70-nvmf-autoconnect.rules"

def dd_mib_s(initiator: VM, command: str) -> float:
    out = initiator.sh(f"{command} 2>&1 | tail -n 1", timeout=900)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not match:
        raise RuntimeError(f"unexpected dd output: {out}")
    return int(match.group(1)) / float(match.group(2)) / (1 << 20)


def timed_start(target: VM, prepare: str, start: str, ready: str) -> float:
    """Run `start` in the background in the target and time it until the shell test
    `ready` holds (polled every 20 ms); then stop it. `ready` and the pause are bash
    builtins: a fork per poll would take CPU from what is measured on this one vCPU."""
    script = (
        f"{prepare}; rm -f /tmp/bench-pause; mkfifo /tmp/bench-pause; exec 9<>/tmp/bench-pause; "
        f"start=$EPOCHREALTIME; {start} & pid=$!; "
        f"until {ready}; do read -t 0.02 -u 9; done; end=$EPOCHREALTIME; kill $pid; wait $pid; exec 9<&-; "
        'awk -v s="$start" -v e="$end" \'BEGIN { printf "elapsed %.3f\\n", e - s }\''
    )
    out = target.sh(script, timeout=300)
    return float(out.split("elapsed")[-1].split()[0])


def bench_files(count: int) -> tuple[str, list[str]]:
    files = [f"/tmp/bench/f{i}.img" for i in range(count)]
    return "rm -rf /tmp/bench; mkdir -p /tmp/bench; " + "; ".join(f"truncate -s 1M {f}" for f in files), files


def process_usage(target: VM, pids: list[str]) -> tuple[float, float]:
    """CPU seconds and resident MiB, summed over the given processes."""
    hz = int(target.sh("getconf CLK_TCK"))
    cpu = rss = 0.0
    for pid in pids:
        cpu += sum(int(t) for t in target.sh(f"cut -d' ' -f14,15 /proc/{pid}/stat").split()) / hz
        rss += int(target.sh(f"awk '/^VmRSS/ {{print $2}}' /proc/{pid}/status")) / 1024
    return cpu, rss


class Implementation:
    """How one exporter is booted, found, connected to and measured."""

    def __init__(self, name: str, append: str, efi: Path | None = None) -> None:
        self.name, self.append = name, append
        self.efi = efi or image(BENCH_IMAGE)  # what the target boots

    def offered(self, initiator: VM, target: VM) -> bool:
        raise NotImplementedError

    def connect(self, initiator: VM, size: int) -> str:
        """Connect the bench disk; return its block device on the initiator."""
        raise NotImplementedError

    def disconnect(self, initiator: VM) -> None:
        raise NotImplementedError

    def daemon_pids(self, target: VM) -> list[str]:
        raise NotImplementedError

    def stop_service(self, target: VM) -> None:
        raise NotImplementedError

    def export_seconds(self, target: VM, count: int) -> float:
        raise NotImplementedError


class NVMeTarget(Implementation):
    def __init__(self, name: str, append: str, unit: str, run: str, port: str = "", efi: Path | None = None) -> None:
        super().__init__(name, append, efi)
        self.unit = unit
        self.run = run  # the daemon by hand, on {files}
        self.port = port  # where it offers discovery; "" = read from the console once the target is up

    def find_port(self, target: VM) -> str:
        if self.port:
            return self.port
        found = re.search(r"Listening on ipv6 \(port (\d+)\)", target.console())
        return found.group(1) if found else ""

    def subsystems_seen(self, initiator: VM) -> int:
        out, rc = initiator.run(f"nvme discover -t tcp -a {TARGET_LL} -f enp0s3 -s {self.port}", 20)
        return out.count("subtype: nvme subsystem") if rc == 0 else 0

    def offered(self, initiator: VM, target: VM) -> bool:
        self.port = self.find_port(target)
        return bool(self.port) and self.subsystems_seen(initiator) >= 1

    def connect(self, initiator: VM, size: int) -> str:
        command = f"nvme connect-all -t tcp -a {TARGET_LL} -f enp0s3 -s {self.port}"
        out, rc = initiator.run(command)
        if rc != 0:  # seen once: "Failed to open ctrl nvme0, errno 11" while it opened its own discovery controller
            print(f"{self.name}: `{command}` exited {rc} ({out.strip()!r}), once more", file=sys.stderr)
            initiator.sh(command)
        # The bench disk by its size: systemd-storagetm does not pass the disk's serial on.
        sizes = {r.block: int(initiator.sh(f"cat /sys/block/{r.block}/size")) * 512 for r in connected(initiator)}
        return "/dev/" + next(block for block, s in sizes.items() if s == size)

    def disconnect(self, initiator: VM) -> None:
        disconnect_all(initiator)

    def daemon_pids(self, target: VM) -> list[str]:
        return [target.sh(f"systemctl show -p MainPID --value {self.unit}")]

    def stop_service(self, target: VM) -> None:
        target.sh(
            "systemctl mask --runtime reboot.target; "  # systemd-storagetm's unit reboots when it dies
            f"systemctl stop {self.unit}; "
            "cd /sys/kernel/config/nvmet && for p in ports/*; do rm -f $p/subsystems/*; rmdir $p; done; "
            "for s in subsystems/*; do echo 0 > $s/namespaces/1/enable; rmdir $s/namespaces/1; rmdir $s; done; "
            "true",
            timeout=120,
        )

    def export_seconds(self, target: VM, count: int) -> float:
        prepare, files = bench_files(count)
        # Only the files count: a running service's own disks are linked already.
        prepare += ("; declare -A before=(); for s in /sys/kernel/config/nvmet/ports/*/subsystems/*; do "
                    '[ -e "$s" ] && before[${s##*/}]=1; done')  # fmt: skip
        linked = ("{ declare -A linked=(); for s in /sys/kernel/config/nvmet/ports/*/subsystems/*; do "
                  f'[ -e "$s" ] && [ -z "${{before[${{s##*/}}]}}" ] && linked[${{s##*/}}]=1; done; '
                  f"[ ${{#linked[@]}} -ge {count} ]; }}")  # fmt: skip
        return timed_start(target, prepare, self.run.format(files=" ".join(files)), linked)


class DiscoveryWatch:
    """A persistent discovery controller on the initiator and a waiter for its log-change
    events: the initiator learns of a new disk when the target tells it, as nvme-stas and
    nvme-cli's autoconnect do, instead of by repeated `nvme discover` connections, which
    load the target while it handles the hotplug and come a few tenths of a second apart."""

    def __init__(self, initiator: VM, port: str) -> None:
        self.initiator, self.port, self.controller = initiator, port, ""

    def __enter__(self) -> DiscoveryWatch:
        sh = self.initiator.sh
        sh(f"mkdir -p {AUTOCONNECT_MASK.rsplit('/', 1)[0]}; ln -sf /dev/null {AUTOCONNECT_MASK}; "
           "udevadm control --reload")  # fmt: skip
        # fd 8 keeps the FIFO open in the debug shell, so what the waiter writes between commands stays.
        script = base64.b64encode(AEN_WAITER.encode()).decode()  # one line through the serial shell
        sh(f"echo {script} | base64 -d > {AEN_FIFO}.py; rm -f {AEN_FIFO}; mkfifo {AEN_FIFO}; "
           f"exec 8<>{AEN_FIFO}; (setsid python3 {AEN_FIFO}.py </dev/null >/dev/null 2>&1 &); "
           'read -t 60 -u 8 line; [ "$line" = ready ]', timeout=90)  # fmt: skip
        sh(f"nvme discover -t tcp -a {TARGET_LL} -f enp0s3 -s {self.port} --persistent >/dev/null")
        self.controller = sh("for c in /sys/class/nvme/nvme*; do "
                             f'[ "$(cat $c/subsysnqn)" = {DISCOVERY_NQN} ] && echo ${{c##*/}}; done; true')  # fmt: skip
        if not self.controller or "\n" in self.controller:
            raise RuntimeError(f"expected one persistent discovery controller, found {self.controller!r}")
        return self

    def subsystems(self) -> int:
        """Read the discovery log through the persistent controller (which also re-arms the event)."""
        return self.initiator.sh(f"nvme discover -d {self.controller}").count("subtype: nvme subsystem")

    def forget_events(self) -> None:
        self.initiator.sh("while read -t 0.01 -u 8 line; do :; done; true")

    def wait_event(self, timeout: float) -> None:
        self.initiator.sh(f'read -t {timeout:.0f} -u 8 line; [ "$line" = aen ]', timeout=timeout + 10)

    def __exit__(self, *_: object) -> None:
        self.initiator.run(f"nvme disconnect -d {self.controller}; pkill -f {AEN_FIFO}.py; exec 8<&-; "
                           f"rm -f {AEN_FIFO} {AEN_FIFO}.py {AUTOCONNECT_MASK}; udevadm control --reload")  # fmt: skip


class NBDServer(Implementation):
    def offered(self, initiator: VM, target: VM) -> bool:
        out, rc = initiator.run(f"timeout 5 nbd-client -l {TARGET_LL} {NBD_PORT}", 20)
        return rc == 0 and "BENCH001" in out

    def connect(self, initiator: VM, size: int) -> str:
        # The netlink setup fails ("Failed to setup device") while udev still probes a fresh or
        # just-released /dev/nbd0: settle, and try again briefly.
        initiator.sh(f"modprobe nbd; udevadm settle; for i in $(seq 10); do "
                     f"nbd-client {TARGET_LL} {NBD_PORT} /dev/nbd0 -N BENCH001 -b 4096 && break; "
                     "sleep 0.5; udevadm settle; done; nbd-client -c /dev/nbd0 >/dev/null")  # fmt: skip
        got = int(initiator.sh("cat /sys/block/nbd0/size")) * 512
        if got != size:
            raise RuntimeError(f"/dev/nbd0 has {got} bytes, the bench disk {size}")
        return "/dev/nbd0"

    def disconnect(self, initiator: VM) -> None:
        initiator.sh("nbd-client -d /dev/nbd0; for i in $(seq 20); do nbd-client -c /dev/nbd0 >/dev/null || break; "
                     "sleep 0.2; done; udevadm settle")  # fmt: skip

    def daemon_pids(self, target: VM) -> list[str]:
        out = target.sh('for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = nbd-server ] && '
                        'echo ${p#/proc/}; done; true')  # fmt: skip
        return out.split()

    def stop_service(self, target: VM) -> None:
        target.sh("systemctl stop nbd-bench.service")

    def export_seconds(self, target: VM, count: int) -> float:
        prepare, files = bench_files(count)
        config = "\\n".join(["[generic]"] + [f"[d{i}]\\nexportname = {f}" for i, f in enumerate(files)])
        listening = ("{ up=; for f in /proc/net/tcp /proc/net/tcp6; do while read -r _ local _ st _; do "
                     f"[[ $local == *:{NBD_PORT:04X} && $st == 0A ]] && up=1; done < $f; done; "
                     '[ -n "$up" ]; }')  # fmt: skip
        return timed_start(target, f"{prepare}; printf '{config}\\n' > /tmp/bench/nbd.conf",
                           "nbd-server -d -C /tmp/bench/nbd.conf >/dev/null 2>&1", listening)  # fmt: skip


def storagetm(name: str = "storagetm", efi: Path | None = None) -> NVMeTarget:
    return NVMeTarget(
        name,
        TARGET_APPEND,
        unit="storagetm.service",
        run="storagetm {files} >/dev/null 2>&1",
        # Port 8009 only refers to the I/O port's discovery service, which lists the
        # disks and tells watching initiators of a new one: the same port as upstream's.
        # (Before 2026-12-02 every subsystem was linked into 4420 too: a baseline image works alike.)
        port=str(IO_TRSVCID),
        efi=efi,
    )


def implementations(baseline: Path | None = None) -> list[Implementation]:
    """storagetm, systemd-storagetm and NBD; with `baseline` (a bench image built from an older
    commit), storagetm of that image instead of NBD, so that both are measured in turns against
    the same systemd-storagetm in one run."""
    anchor = NVMeTarget(
        "systemd-storagetm",
        f"{TARGET_APPEND} systemd.mask=storagetm.service systemd.wants=systemd-storagetm.service",
        unit="systemd-storagetm.service",
        run="/usr/lib/systemd/systemd-storagetm {files} >/dev/null 2>&1 </dev/null",
    )
    if baseline is not None:
        return [storagetm(), storagetm(BASELINE, baseline), anchor]
    return [
        storagetm(),
        anchor,
        NBDServer(
            "nbd",  # storage-target-mode.target pulls in udev and the network only through storagetm
            f"{TARGET_APPEND} systemd.unit=multi-user.target systemd.mask=storagetm.service "
            "systemd.wants=nbd-bench.service",
        ),
    ]


class Bench:
    """Every boot of every implementation gives samples of each figure; the implementations
    take turns, in alternating order, so that drift of this shared machine hits all alike."""

    def __init__(self, workdir: Path, initiator: VM, size_mib: int, rounds: int, hotplugs_per_boot: int) -> None:
        self.workdir, self.initiator = workdir, initiator
        self.size_mib, self.rounds, self.hotplugs_per_boot = size_mib, rounds, hotplugs_per_boot
        self.samples: dict[str, dict[str, list[float]]] = {}  # every sample of every boot, for the JSON
        self.disk = Disk(workdir / "BENCH001.img", "virtio", "BENCH001")
        make_disk(self.disk.path, size_mib << 20, b"BENCH001")

    def boot(self, impl: Implementation, run: int) -> tuple[VM, float]:
        """Boot a target with `impl`; return it and the seconds until the initiator sees the disk."""
        target = target_vm(self.workdir / f"{impl.name}-{run}", self.workdir / "link.sock", kernel=impl.efi,
                           append=impl.append, disks=[self.disk], extra=self.hotplug_ports())  # fmt: skip
        started = time.monotonic()
        target.start()
        try:
            until(lambda: impl.offered(self.initiator, target), BOOT_TIMEOUT,
                  f"{impl.name}: disk not offered within {BOOT_TIMEOUT:.0f} s", pause=0.2)  # fmt: skip
        except BaseException:
            target.stop()
            raise
        return target, time.monotonic() - started

    def hotplug_ports(self) -> list[str]:
        """Root ports hp1… beside the VM's own hp0, one per hot-plugged disk."""
        return [arg for i in range(1, self.hotplugs_per_boot) for arg in
                ("-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1},addr=0x{0x10 + i:x}")]  # fmt: skip

    def hotplug(self, impl: NVMeTarget, target: VM, watch: DiscoveryWatch, run: int, index: int) -> float:
        hot = Disk(self.workdir / f"{impl.name}-{run}-HOT{index}.img", "virtio", f"HOT{index:05d}")
        make_disk(hot.path, 16 << 20, hot.serial.encode())
        before = watch.subsystems()
        watch.forget_events()
        plugged = target.hotplug(hot, bus=f"hp{index}")  # timed from its device_add
        elapsed = 0.0

        def in_log() -> bool:
            nonlocal elapsed
            watch.wait_event(max(1.0, plugged + 120 - time.monotonic()))
            elapsed = time.monotonic() - plugged  # when the event came, before the log is read
            return watch.subsystems() > before

        until(
            in_log,
            plugged + 120 - time.monotonic(),
            f"{impl.name}: discovery log changed, but hot-plugged disk {index} not in it within 120 s",
            pause=0,
        )
        return elapsed

    def throughput(self, impl: Implementation, direction: str = "read") -> list[float]:
        size = self.size_mib << 20
        dev = impl.connect(self.initiator, size)
        try:
            if direction == "read":
                command = f"dd if={dev} of=/dev/null bs=1M count={self.size_mib} iflag=direct"
            else:
                command = f"dd if=/dev/zero of={dev} bs=1M count={self.size_mib} oflag=direct"
            return [dd_mib_s(self.initiator, command) for _ in range(self.rounds)]
        finally:
            impl.disconnect(self.initiator)

    def mode_read(self, impl: NVMeTarget, target: VM, flag: str) -> list[float]:
        """storagetm restarted by hand in a mode; sequential read of the bench disk."""
        target.sh(f"systemd-run --unit=bench-mode storagetm {flag} /dev/disk/by-id/virtio-BENCH001")
        until(lambda: impl.subsystems_seen(self.initiator) >= 1, 120, f"storagetm {flag}: not within 120 s", pause=0.2)
        try:
            return self.throughput(impl)
        finally:
            target.sh("systemctl stop bench-mode.service")

    def sample_boot(self, impl: Implementation, run: int, *, last: bool) -> None:
        """One boot's samples; the last boot also measures what is taken once (export times)."""
        target, ready = self.boot(impl, run)
        samples = self.samples.setdefault(impl.name, {})

        def add(key: str, values: list[float]) -> None:
            samples.setdefault(key, []).extend(values)

        add("ready_s", [ready])
        try:
            target.wait_shell(60)
            if isinstance(impl, NVMeTarget):
                with DiscoveryWatch(self.initiator, impl.port) as watch:
                    add("hotplug_s", [self.hotplug(impl, target, watch, run, i) for i in range(self.hotplugs_per_boot)])
            add("read_mib_s", self.throughput(impl, "read"))
            add("write_mib_s", self.throughput(impl, "write"))
            if isinstance(impl, NBDServer):  # its per-connection child counts too: measure while connected
                impl.connect(self.initiator, self.size_mib << 20)
            cpu, rss = process_usage(target, impl.daemon_pids(target))
            add("daemon_cpu_s", [cpu])
            add("daemon_rss_mib", [rss])
            if isinstance(impl, NBDServer):
                impl.disconnect(self.initiator)
            if last and impl.name == "storagetm":  # the command hands the files to the running service
                for n in EXPORT_COUNTS:
                    add(f"handover_{n}_s", [impl.export_seconds(target, n)])
            impl.stop_service(target)
            if isinstance(impl, NVMeTarget) and impl.name == "storagetm":
                add("read_ro_mib_s", self.mode_read(impl, target, "--read-only"))
                add("read_snapshot_mib_s", self.mode_read(impl, target, "--snapshot"))
            if last:
                for n in EXPORT_COUNTS:
                    add(f"export_{n}_s", [impl.export_seconds(target, n)])
        finally:
            target.stop()

    def run(self, boots: int, impls: list[Implementation]) -> dict[str, dict[str, float | None]]:
        for run in range(boots):
            for impl in impls if run % 2 == 0 else impls[::-1]:
                self.sample_boot(impl, run, last=run == boots - 1)
        return {impl.name: {key: statistics.median(values) if (values := self.samples[impl.name].get(key)) else None
                            for _, key in ROWS}
                for impl in impls}  # fmt: skip


def saved_runs(count: int, kind: str = "compare") -> list[dict[str, Any]]:
    """The latest `count` runs' JSON, oldest first."""
    paths = sorted(RESULTS.glob(f"{kind}-*.json"))[-count:]
    if not paths:
        raise SystemExit(f"bench.compare: no run in {RESULTS}; run it without --report-only first")
    return [json.loads(path.read_text()) for path in paths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="dd runs per throughput figure")
    parser.add_argument("--boots", type=int, default=5, help="boots per implementation, each one sampling every figure")
    parser.add_argument("--hotplugs", type=int, default=5, help="hot-plugged disks per boot of an NVMe implementation")
    parser.add_argument("--runs", type=int, default=2, help="latest runs the report shows side by side")
    parser.add_argument("--report-only", action="store_true", help="redo tables, chart and README from the saved runs")
    parser.add_argument("--baseline", type=Path, metavar="EFI",
                        help="a bench image built from an older commit: its storagetm is measured in turns beside "
                        "this one's and systemd-storagetm (instead of NBD); saved as baseline-<start>.json, "
                        "reported apart from README's tables")  # fmt: skip
    args = parser.parse_args()
    if args.baseline is not None:
        if not args.report_only:
            run_once(args, "baseline")
        print(baseline_report(saved_runs(args.runs, "baseline"), RESULTS))
        return 0
    if not args.report_only:
        run_once(args)
    print(report(saved_runs(args.runs), RESULTS, README))
    return 0


def run_once(args: argparse.Namespace, kind: str = "compare") -> None:
    """One run of every boot, saved as bench/results/<kind>-<start>.json."""
    started = time.gmtime()
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-compare-"))
    with running_initiator(workdir, workdir / "link.sock", image(BENCH_IMAGE)) as initiator:
        bench = Bench(workdir, initiator, args.size_mib, args.rounds, args.hotplugs)
        results = bench.run(args.boots, implementations(args.baseline))
    qemu = subprocess.getoutput(f"{qemu_binary()} --version").split()[3]
    meta = {
        "date": time.strftime("%Y-%m-%d", started),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", started),
        "machine": f"{subprocess.getoutput('nproc')} cores, {subprocess.getoutput('uname -m')}, QEMU {qemu} "
                   f"-cpu {qemu_cpu()}",
        "boots": str(args.boots),
        "hotplugs": str(args.hotplugs),
        "rounds": str(args.rounds),
    }
    if args.baseline is not None:
        meta["baseline"] = args.baseline.name
    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "size_mib": args.size_mib, "rounds": args.rounds, "results": results,
            "samples": bench.samples}  # fmt: skip
    (RESULTS / time.strftime(f"{kind}-%Y%m%dT%H%M.json", started)).write_text(json.dumps(data, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
