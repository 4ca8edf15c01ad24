"""Sequential read and write throughput over iSCSI as a ratio to NVMe/TCP, measured side by
side in one boot: one target VM exports two disks of the same size (every disk goes out over
both fabrics), the initiator connects one over NVMe/TCP and the other over iSCSI, and reads
and writes each in turn, several rounds, interleaved, so the noise of this shared machine
hits both alike. The disks swap fabrics every round, so neither disk's place counts.

    python3 -m bench.iscsi [--size-mib 128] [--rounds 3]

Prints a table and writes bench/results/iscsi.json. Not part of CI (slow, noisy)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.compare import dd_mib_s
from bench.summary import arguments, save, summarise
from testbed.initiator import CONNECT, connected, disconnect_all, wait_address
from testbed.iscsi import discover, login, logout_all, prepare_iscsi, targets_by_serial
from testbed.pair import TARGET_APPEND, vm_pair

SERIALS = ("BENCHIS1", "BENCHIS2")


def main() -> int:
    args = arguments(__doc__ or "")
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-"))
    kinds = {serial: "virtio" for serial in SERIALS}
    with vm_pair(workdir, kinds, TARGET_APPEND, disk_size=args.size_mib << 20, shell_timeout=300) as pair:
        pair.target.wait_for(r"Exported disks \(2\)", 300)
        address = wait_address(pair.target, "169.254.")
        prepare_iscsi(pair.initiator)
        iqns = targets_by_serial(pair.target)
        status = json.loads(pair.target.sh("storagetm status --json"))
        nqns = {e["disk"]["serial"]: e["nqn"] for e in status["exports"]}
        discover(pair.initiator, address)
        names = [f"{fabric}_{op}" for fabric in ("nvme", "iscsi") for op in ("read", "write")]
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            nvme_serial, iscsi_serial = SERIALS if round_ % 2 == 0 else SERIALS[::-1]
            pair.initiator.sh(f"{CONNECT} -a {address} -n {nqns[nvme_serial]}")
            nvme = "/dev/" + next(r.block for r in connected(pair.initiator) if r.serial == nvme_serial)
            iscsi = login(pair.initiator, iqns[iscsi_serial], f"{address}:3260")
            for fabric, device in (("nvme", nvme), ("iscsi", iscsi)):
                read = f"dd if={device} of=/dev/null bs=1M count={args.size_mib} iflag=direct"
                samples[f"{fabric}_read"].append(dd_mib_s(pair.initiator, read))
            for fabric, device in (("nvme", nvme), ("iscsi", iscsi)):
                write = f"dd if=/dev/zero of={device} bs=1M count={args.size_mib} oflag=direct conv=fsync"
                samples[f"{fabric}_write"].append(dd_mib_s(pair.initiator, write))
            disconnect_all(pair.initiator)
            logout_all(pair.initiator)
            discover(pair.initiator, address)  # the node records again, for the next login
        median, result = summarise(args.size_mib, args.rounds, samples)
        result["iscsi_to_nvme"] = {op: median[f"iscsi_{op}"] / median[f"nvme_{op}"] for op in ("read", "write")}
        save("iscsi", result)
        print("| | NVMe/TCP MiB/s | iSCSI MiB/s | iSCSI / NVMe/TCP |\n|---|---|---|---|")
        for op in ("read", "write"):
            print(f"| {op} | {median[f'nvme_{op}']:.1f} | {median[f'iscsi_{op}']:.1f} | "
                  f"{result['iscsi_to_nvme'][op]:.2f} |")  # fmt: skip
        return 0


if __name__ == "__main__":
    sys.exit(main())
