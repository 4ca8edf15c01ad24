"""Boot to a disk offered: the USB stick under enforced Secure Boot (shim, systemd-boot and its
menu, Debian's signed kernel) against the UKI booted directly with Secure Boot off, measured
side by side in one run: one initiator VM stays up, and target VMs boot in turns, alternating
which goes first, so drift of this shared machine hits both alike.

    python3 -m bench.secureboot [--boots 3]

Ready = QEMU start until the initiator's `nvme discover` lists the disk. The stick's figure
includes its menu's timeout (the default entry boots untouched after it), which a person
skips with Enter; the table shows it with and without. Prints the table and writes
bench/results/secureboot.json. Not part of CI: slow, and this machine is shared and noisy."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.compare import TARGET_LL
from ci.boot_menu import MENU_TIMEOUT
from testbed.machine import VM, Disk, boot_drive, make_disk
from testbed.pair import BOOT_TIMEOUT, image, running_initiator, target_vm
from testbed.wait import until

KINDS = ("uki", "secure-boot-stick")


def offered(initiator: VM) -> bool:
    out, rc = initiator.run(f"nvme discover -t tcp -a {TARGET_LL} -f enp0s3", 20)
    return rc == 0 and "subtype: nvme subsystem" in out


def boot_seconds(kind: str, workdir: Path, run: int, disk: Disk, stick: Path, initiator: VM) -> float:
    workdir, link = workdir / f"{kind}-{run}", workdir / "link.sock"
    if kind == "uki":  # its own command line: no -append
        target = target_vm(workdir, link, kernel=image("storagetm.efi"), disks=[disk])
    else:
        target = target_vm(workdir, link, kernel=None, disks=[disk], extra=boot_drive(stick, snapshot=True),
                           secure_boot=True)  # fmt: skip
    started = time.monotonic()
    target.start()
    try:
        until(lambda: offered(initiator), BOOT_TIMEOUT, f"{kind}: disk not offered within {BOOT_TIMEOUT:.0f} s", 0.5)
        return time.monotonic() - started
    finally:
        target.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-sb-"))
    stick = workdir / "storagetm.raw"
    shutil.copy(image("storagetm.raw"), stick)
    disk = Disk(workdir / "BENCHSB1.img", "virtio", "BENCHSB1")
    make_disk(disk.path, 16 << 20, b"BENCHSB1")
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with running_initiator(workdir, workdir / "link.sock") as initiator:
        for run in range(args.boots):
            for kind in KINDS if run % 2 == 0 else reversed(KINDS):
                samples[kind].append(boot_seconds(kind, workdir, run, disk, stick, initiator))
                print(f"{kind} boot {run}: {samples[kind][-1]:.1f} s", flush=True)
    median = {kind: statistics.median(values) for kind, values in samples.items()}
    without_menu = median["secure-boot-stick"] - MENU_TIMEOUT
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "boots": args.boots,
        "seconds": samples,
        "median_s": median,
        "menu_timeout_s": MENU_TIMEOUT,
        "ratio": median["secure-boot-stick"] / median["uki"],
        "ratio_without_menu_timeout": without_menu / median["uki"],
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "secureboot.json").write_text(json.dumps(result, indent=1))
    print("| boot → disk offered | median s | ÷ UKI, Secure Boot off |\n|---|---|---|")
    print(f"| UKI (`-kernel`), Secure Boot off | {median['uki']:.1f} | 1.00 |")
    print(f"| USB stick, Secure Boot on | {median['secure-boot-stick']:.1f} | {result['ratio']:.2f} |")
    print(f"| … less the menu's {MENU_TIMEOUT} s | {without_menu:.1f} | {result['ratio_without_menu_timeout']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
