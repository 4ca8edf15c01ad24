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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import TARGET_LL, until
from ci.boot_menu import MENU_TIMEOUT
from tests.vm.conftest import BOOT_TIMEOUT, initiator_vm, prepare_initiator
from tests.vm.machine import VM, Disk, make_disk

KINDS = ("uki", "secure-boot-stick")


def offered(initiator: VM) -> bool:
    out, rc = initiator.run(f"nvme discover -t tcp -a {TARGET_LL} -f enp0s3", 20)
    return rc == 0 and "subtype: nvme subsystem" in out


def boot_seconds(kind: str, workdir: Path, run: int, disk: Disk, stick: Path, initiator: VM) -> float:
    target = VM("target", workdir / f"{kind}-{run}", disks=[disk], link_socket=workdir / "link.sock",
                link_server=False, mac="52:54:00:00:00:01")  # fmt: skip
    if kind == "uki":
        target.kernel = Path("mkosi.output/storagetm.efi").resolve()
    else:
        target.secure_boot = True
        target.extra = ["-drive", f"if=none,id=boot,format=raw,file={stick},snapshot=on",
                        "-device", "usb-storage,bus=xhci.0,drive=boot,bootindex=0,serial=BOOTSTICK"]  # fmt: skip
    started = time.monotonic()
    target.start()
    try:
        until(lambda: offered(initiator), BOOT_TIMEOUT, f"{kind}: disk offered", pause=0.5)
        return time.monotonic() - started
    finally:
        target.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="storagetm-bench-sb-"))
    stick = workdir / "storagetm.raw"
    shutil.copy("mkosi.output/storagetm.raw", stick)
    disk = Disk(workdir / "BENCHSB1.img", "virtio", "BENCHSB1")
    make_disk(disk.path, 16 << 20, b"BENCHSB1")
    initiator = initiator_vm(workdir, workdir / "link.sock")
    initiator.start()
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        initiator.wait_shell(BOOT_TIMEOUT)
        prepare_initiator(initiator)
        for run in range(args.boots):
            for kind in KINDS if run % 2 == 0 else reversed(KINDS):
                samples[kind].append(boot_seconds(kind, workdir, run, disk, stick, initiator))
                print(f"{kind} boot {run}: {samples[kind][-1]:.1f} s", flush=True)
    finally:
        initiator.stop()
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
