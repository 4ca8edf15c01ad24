"""How often a TCG guest crashes under NVMe/TCP load, for one QEMU binary and CPU model: the
initiator's kernel panics (double faults, impossible RFLAGS) that made the VM suite flaky.

    python3 -m bench.tcg_stability --label qemu-7.2-max [--qemu PATH] [--cpu qemu64] [--minutes 10]

One target exports three disks; the initiator reads them whole (O_DIRECT into sha256sum,
every byte over the link) in turns until the time is up. A panic (or a hung shell) is counted, both VMs are
booted again, and the reading goes on. Prints GiB read and crashes, and writes
bench/results/tcg-stability-LABEL.json. Run the configurations one after another on an
otherwise idle machine; never two at once (both cores saturate). Not part of CI."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from testbed import VMError
from testbed.initiator import CONNECT_ALL, connected, prepare_initiator, wait_address
from testbed.machine import PANIC, VM, qemu_binary, qemu_cpu
from testbed.pair import BOOT_TIMEOUT, vm_pair

KINDS = {"STRESS01": "virtio", "STRESS02": "nvme", "STRESS03": "sata"}
SIZE = 64 << 20


def attach(initiator: VM, target: VM) -> list[str]:
    initiator.wait_shell(BOOT_TIMEOUT)
    prepare_initiator(initiator)
    initiator.sh(f"{CONNECT_ALL} -a {wait_address(target, '169.254.')}")
    return [remote.block for remote in connected(initiator)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--qemu", default=qemu_binary())
    parser.add_argument("--cpu", default=qemu_cpu())
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=f"storagetm-stability-{args.label}-"))
    os.environ["STORAGETM_QEMU"], os.environ["STORAGETM_QEMU_CPU"] = args.qemu, args.cpu  # every VM below
    crashes: list[dict[str, object]] = []
    read_bytes = rounds = 0
    deadline = time.monotonic() + args.minutes * 60
    while time.monotonic() < deadline:
        # A new pair after each crash: the initiator serves the link, which the target cannot rejoin.
        with vm_pair(workdir / f"boot-{len(crashes)}", KINDS, disk_size=SIZE, shell_timeout=None) as pair:
            try:
                pair.target.wait_for(r"Exported disks \(3\)", BOOT_TIMEOUT)
                blocks = attach(pair.initiator, pair.target)
                while time.monotonic() < deadline:
                    for block in blocks:
                        # O_DIRECT: every round crosses the link, none is served from the page cache.
                        pair.initiator.sh(f"dd if=/dev/{block} bs=1M iflag=direct status=none | sha256sum",
                                          timeout=120)  # fmt: skip
                        read_bytes += SIZE
                    rounds += 1
            except VMError as exc:
                panic = [f"{vm.name}: {ln}" for vm in (pair.initiator, pair.target)
                         for ln in vm.console().splitlines() if PANIC.search(ln)]  # fmt: skip
                crashes.append({"after_gib": read_bytes / (1 << 30), "what": (panic or [str(exc)])[:3]})
                print(f"{args.label}: crash after {read_bytes / (1 << 30):.2f} GiB: {crashes[-1]['what']}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "label": args.label, "qemu": args.qemu, "cpu": args.cpu,
        "minutes": args.minutes, "rounds": rounds, "gib_read": read_bytes / (1 << 30), "crashes": crashes,
    }  # fmt: skip
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"tcg-stability-{args.label}.json").write_text(json.dumps(result, indent=1))
    print(f"{args.label}: {result['gib_read']:.2f} GiB read in {args.minutes:.0f} min, {len(crashes)} crash(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
