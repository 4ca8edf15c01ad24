"""Sequential read throughput in read-only and snapshot modes as a ratio to read-write,
measured side by side in one run: one target VM exports three disks of the same size,
one per mode, and the initiator reads each in turn, several rounds, interleaved, so the
noise of this shared machine hits all three alike.

    python3 -m bench.modes [--size-mib 128] [--rounds 3]

Prints a table and writes bench/results/modes.json. Not part of CI (slow, noisy)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from bench.summary import arguments, save_ratios
from testbed.initiator import connected, wait_address
from testbed.machine import VM
from testbed.pair import TARGET_APPEND, vm_pair

SERIALS = {"rw": "BENCHRW1", "ro": "BENCHRO1", "snapshot": "BENCHSN1"}


def read_mib_s(initiator: VM, block: str, size_mib: int) -> float:
    out = initiator.sh(
        f"dd if=/dev/{block} of=/dev/null bs=1M count={size_mib} iflag=direct 2>&1 | tail -n 1", timeout=900
    )
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not match:
        raise RuntimeError(f"unexpected dd output: {out}")
    return int(match.group(1)) / float(match.group(2)) / (1 << 20)


def main() -> int:
    args = arguments(__doc__ or "")
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-"))
    kinds = {serial: "virtio" for serial in SERIALS.values()}
    append = f"{TARGET_APPEND} storagetm.mode=rw,{SERIALS['ro']}=ro,{SERIALS['snapshot']}=snapshot"
    with vm_pair(workdir, kinds, append, disk_size=args.size_mib << 20, shell_timeout=300) as pair:
        pair.target.wait_for(r"Exported disks \(3\)", 300)
        address = wait_address(pair.target, "169.254.")
        pair.initiator.sh(f"nvme connect-all -t tcp -a {address}")
        blocks = {r.serial: r.block for r in connected(pair.initiator)}
        samples: dict[str, list[float]] = {mode: [] for mode in SERIALS}
        for _ in range(args.rounds):
            for mode, serial in SERIALS.items():
                samples[mode].append(read_mib_s(pair.initiator, blocks[serial], args.size_mib))
        save_ratios("modes", args.size_mib, args.rounds, samples, "rw")
        return 0


if __name__ == "__main__":
    sys.exit(main())
