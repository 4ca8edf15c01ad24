"""The helper's copy against a plain `dd` over NVMe/TCP, measured side by side in one boot:
the initiator connects the target's disk with `storagetm connect`, then each round copies it
to a file three ways, interleaved so the noise of this shared machine hits all alike: `dd`,
`storagetm copy --no-verify`, and `storagetm copy` (with the verification, which reads the
disk and the copy once more). The goal is at least 0.9 x dd's rate before verification.

    python3 -m bench.helper_copy [--size-mib 128] [--rounds 3]

Prints a table and writes bench/results/helper_copy.json. Not part of CI (slow, noisy)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.summary import arguments, save_ratios
from testbed.initiator import connected, disconnect_all, wait_address
from testbed.machine import VM
from testbed.pair import TARGET_APPEND, vm_pair

SERIAL = "BENCHHC1"
PYZ = "python3 /usr/share/storagetm/storagetm.pyz"
DEST = "/var/tmp/bench-copy.img"


def timed_mib_s(initiator: VM, command: str, size_mib: int) -> float:
    """MiB/s of a command, timed on the initiator itself (the shell's round trip left out)."""
    out = initiator.sh(f"s=$(date +%s.%N); {command} >/tmp/bench-copy.out 2>&1; rc=$?; e=$(date +%s.%N); "
                       'echo "$rc $s $e"', timeout=1800)  # fmt: skip
    rc, start, end = out.split()[-3:]
    if rc != "0":
        raise RuntimeError(f"`{command}` failed: {initiator.sh('cat /tmp/bench-copy.out')}")
    return size_mib / (float(end) - float(start))


def main() -> int:
    args = arguments(__doc__ or "")
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-"))
    with vm_pair(workdir, {SERIAL: "virtio"}, TARGET_APPEND, disk_size=args.size_mib << 20, shell_timeout=300) as pair:
        pair.target.wait_for(r"Exported disks \(1\)", 300)
        wait_address(pair.target, "169.254.")
        code = json.loads(pair.target.sh("storagetm status --json"))["connection_code"]  # no secrets: shown
        disconnect_all(pair.initiator)
        pair.initiator.sh(f"{PYZ} connect {code}", timeout=180)
        device = "/dev/" + next(r.block for r in connected(pair.initiator) if r.serial == SERIAL)
        samples: dict[str, list[float]] = {"dd": [], "helper_no_verify": [], "helper_verified": []}
        clean = f"rm -f {DEST} {DEST}.storagetm-copy; echo 3 > /proc/sys/vm/drop_caches"
        for _ in range(args.rounds):
            pair.initiator.sh(clean)
            # Timed as the helper is (wall clock, process start included), not by dd's own figure.
            samples["dd"].append(timed_mib_s(pair.initiator, f"dd if={device} of={DEST} bs=1M conv=fsync",
                                             args.size_mib))  # fmt: skip
            pair.initiator.sh(clean)
            samples["helper_no_verify"].append(timed_mib_s(pair.initiator, f"{PYZ} copy --no-verify {device} {DEST}",
                                                           args.size_mib))  # fmt: skip
            pair.initiator.sh(clean)
            samples["helper_verified"].append(timed_mib_s(pair.initiator, f"{PYZ} copy {device} {DEST}", args.size_mib))
        pair.initiator.sh(f"{clean}; {PYZ} disconnect")
        save_ratios("helper_copy", args.size_mib, args.rounds, samples, "dd")
        return 0


if __name__ == "__main__":
    sys.exit(main())
