"""Download throughput of the web page's raw images as a ratio to a `dd` over NVMe/TCP,
side by side in one boot: the target exports two disks of the same size, the initiator
reads one with dd from its NVMe/TCP namespace and downloads the other over HTTP (busybox
wget to /dev/null: a streaming C client, as curl would be), several rounds, the disks
swapping roles every round. The target's page cache is dropped before each read: nvmet's
block backend bypasses it, the web server's sendfile does not.

    python3 -m bench.web [--size-mib 128] [--rounds 3]

Prints a table and writes bench/results/web.json. Not part of CI (slow, noisy)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.compare import dd_mib_s
from bench.summary import arguments, save, summarise
from testbed.initiator import CONNECT, connected, disconnect_all, wait_address
from testbed.machine import VM
from testbed.pair import TARGET_APPEND, vm_pair

SERIALS = ("BENCHWB1", "BENCHWB2")
DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches"


def download_mib_s(initiator: VM, url: str, size: int) -> float:
    out = initiator.sh(f"s=$EPOCHREALTIME; busybox wget -q -O /dev/null {url} && echo $s $EPOCHREALTIME",
                       timeout=900)  # fmt: skip
    start, end = (float(t) for t in out.split()[-2:])
    return size / (end - start) / (1 << 20)


def main() -> int:
    args = arguments(__doc__ or "")
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-"))
    size = args.size_mib << 20
    with vm_pair(workdir, {serial: "virtio" for serial in SERIALS}, TARGET_APPEND, disk_size=size,
                 shell_timeout=300) as pair:  # fmt: skip
        pair.target.wait_for(r"Exported disks \(2\)", 300)
        address = wait_address(pair.target, "169.254.")
        status = json.loads(pair.target.sh("storagetm status --json"))
        nqns = {e["disk"]["serial"]: e["nqn"] for e in status["exports"]}
        names = {e["disk"]["serial"]: e["disk"]["name"] for e in status["exports"]}
        samples: dict[str, list[float]] = {"nvme_read": [], "web_download": []}
        for round_ in range(args.rounds):
            nvme_serial, web_serial = SERIALS if round_ % 2 == 0 else SERIALS[::-1]
            pair.initiator.sh(f"{CONNECT} -a {address} -n {nqns[nvme_serial]}")
            nvme = "/dev/" + next(r.block for r in connected(pair.initiator) if r.serial == nvme_serial)
            pair.target.sh(DROP_CACHES)
            read = f"dd if={nvme} of=/dev/null bs=1M count={args.size_mib} iflag=direct"
            samples["nvme_read"].append(dd_mib_s(pair.initiator, read))
            pair.target.sh(DROP_CACHES)
            url = f"http://{address}/disks/{names[web_serial]}.img"
            samples["web_download"].append(download_mib_s(pair.initiator, url, size))
            disconnect_all(pair.initiator)
        median, result = summarise(args.size_mib, args.rounds, samples)
        result["web_to_nvme"] = median["web_download"] / median["nvme_read"]
        save("web", result)
        print("| NVMe/TCP dd MiB/s | web download MiB/s | web / NVMe/TCP |\n|---|---|---|")
        print(f"| {median['nvme_read']:.1f} | {median['web_download']:.1f} | {result['web_to_nvme']:.2f} |")
        return 0


if __name__ == "__main__":
    sys.exit(main())
