"""systemd's own TEST-84-STORAGETM (test/units/TEST-84-STORAGETM.sh), step by step against
storagetm: `--list-devices`; a 10 MiB file exported under `systemd-run -p Type=notify` with
$SYSTEMD_NVME_UUID set and the option after the file argument; the initiator connects and
finds the disk as /dev/disk/by-id/nvme-uuid.<uuid>; `dd | cmp` byte for byte.

Upstream runs target and initiator in one VM over 127.0.0.1; here they are the two VMs of
the suite, over the link. The one deliberate difference: the port is 4420 (upstream's is
hashed from the NQN, 16858 for its `--nqn=quux`). The file's content is pseudo-random from a
fixed seed, made on both VMs, so that the initiator can `cmp` against its own copy as
upstream does against the file.
"""

from __future__ import annotations

import uuid

import pytest

from testbed.initiator import CONNECT_ALL, disconnect_all, wait_address
from testbed.pair import BOOT_TIMEOUT, SUBSYSTEMS, Pair, exported_subsystems

pytestmark = pytest.mark.vm

DISKS = {"VIRT0084": "virtio"}
FILE = "/var/tmp/storagetm.test"
QUUX = "quux"  # as upstream: a plain name, not of the NVMe form
UNIT = "teststoragetm.service"
# dd if=/dev/urandom bs=1024 count=10240, but the same bytes on both VMs.
MAKE_FILE = ("python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(84).randbytes(10240 * 1024))' "
             "> {path}")  # fmt: skip


def test_upstream_storagetm_steps(pair: Pair) -> None:
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT)
    address = wait_address(pair.target, "fe80::")  # from the image's instance, before it stops
    pair.target.sh("storagetm --list-devices")  # upstream: exits 0
    pair.target.sh("systemctl stop storagetm")  # ours takes the ports and the state file
    assert pair.target.sh(f"ls -A {SUBSYSTEMS}").split() == []
    pair.target.sh(MAKE_FILE.format(path=FILE), timeout=120)
    pair.initiator.sh(MAKE_FILE.format(path="/tmp/storagetm.test"), timeout=120)
    nvme_uuid = str(uuid.uuid4())
    try:
        # Type=notify: systemd-run returns once storagetm said READY=1, i.e. the file is exported.
        pair.target.sh(f"systemd-run -u {UNIT} -p Type=notify -p Environment=SYSTEMD_NVME_UUID={nvme_uuid} "
                       f"/usr/bin/storagetm {FILE} --nqn={QUUX}", timeout=120)  # fmt: skip
        (subsystem,) = exported_subsystems(pair.target)
        assert subsystem.startswith(f"{QUUX}.")
        assert pair.target.sh(f"cat {SUBSYSTEMS}/{subsystem}/namespaces/1/device_uuid") == nvme_uuid
        device = f"/dev/disk/by-id/nvme-uuid.{nvme_uuid}"
        pair.initiator.sh(f"{CONNECT_ALL} -a {address} -s 4420")
        pair.initiator.sh(f"udevadm wait --timeout=60 --settle {device}", timeout=90)
        pair.initiator.sh(f"dd if={device} bs=1024 | cmp /tmp/storagetm.test -", timeout=300)
    finally:
        disconnect_all(pair.initiator)
        pair.target.run(f"systemctl stop {UNIT}; rm -f {FILE}")
    assert pair.target.sh(f"ls -A {SUBSYSTEMS}").split() == []
    since = len(pair.target.console())
    pair.target.sh("systemctl start storagetm")
    pair.target.wait_for(r"Exported disks \(1\)", BOOT_TIMEOUT, since=since)
