"""The demo: boot the image as a target with sample disks, boot an initiator VM, connect
over NVMe/TCP with nvme-cli's defaults, copy a disk with visible progress, and show the
checksums match. Run by ci/demo.sh after the image build."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from testbed.initiator import connected, wait_address
from testbed.pair import vm_pair

DEMO_DISK_SIZE = 128 << 20  # a few seconds of copying each, so dd's progress shows


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-demo-"))
    print(f"demo: booting target and initiator VMs under TCG (logs in {workdir})", flush=True)
    disks = {"DEMO0001": "nvme", "DEMO0002": "sata", "DEMO0003": "usb"}
    with vm_pair(workdir, disks, disk_size=DEMO_DISK_SIZE, shell_timeout=300) as pair:
        pair.target.wait_for(r"Exported disks \(3\)", 300)
        address = wait_address(pair.target, "169.254.")
        # `storagetm status` renders the same screen as tty1 and the serial console show.
        print("demo: the target's screen says:\n")
        print(pair.target.sh("storagetm status"))
        print(f"demo: on the initiator: nvme connect-all -t tcp -a {address}", flush=True)
        pair.initiator.sh(f"nvme connect-all -t tcp -a {address}")
        ok = True
        for remote in connected(pair.initiator):
            print(f"demo: copying {remote.serial} ({remote.model}) from /dev/{remote.block} …", flush=True)
            out = pair.initiator.sh(
                f"dd if=/dev/{remote.block} of=/tmp/copy bs=1M status=progress 2>&1 | tr '\\r' '\\n' | grep -v '^$';"
                " sha256sum /tmp/copy; rm -f /tmp/copy",
                timeout=600,
            )
            got = out.split()[-2]
            want = pair.sums[remote.serial]
            print(out)
            print(f"demo: {remote.serial}: copy {got[:16]}… disk file {want[:16]}… "
                  f"{'MATCH' if got == want else 'MISMATCH'}", flush=True)  # fmt: skip
            ok &= got == want
        pair.initiator.sh("nvme disconnect-all")
        print("demo: all copies verified" if ok else "demo: checksum mismatch!")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
