"""What the initiator VM does with open-iscsi (iscsiadm, iscsid): the iSCSI half of the
suite, beside testbed.initiator's nvme-cli."""

from __future__ import annotations

import json

from testbed.machine import VM
from testbed.wait import until

INITIATOR_NAME = "iqn.2024-01.io.storagetm.test:initiator"
SESSION_EXISTS = 15  # iscsiadm's ISCSI_ERR_SESS_EXISTS


def prepare_iscsi(initiator: VM) -> None:
    """An initiator name of its own (the image's is made at build time), iscsid running."""
    initiator.sh(f"mkdir -p /etc/iscsi && echo InitiatorName={INITIATOR_NAME} > /etc/iscsi/initiatorname.iscsi")
    initiator.sh("systemctl restart iscsid")


def discover(initiator: VM, address: str) -> dict[str, str]:
    """SendTargets discovery: IQN -> the portal it gives (`ADDRESS:3260`)."""
    out = initiator.sh(f"iscsiadm -m discovery -t sendtargets -p {address}:3260")
    found = {}
    for line in out.splitlines():
        portal, _, iqn = line.partition(" ")
        if iqn.startswith("iqn."):
            found[iqn] = portal.partition(",")[0]
    return found


def targets_by_serial(target: VM) -> dict[str, str]:
    """Serial -> IQN, as `storagetm status --json` gives them."""
    status = json.loads(target.sh("storagetm status --json"))
    return {e["disk"]["serial"]: e["iqn"] for e in status["exports"]}


def login(initiator: VM, iqn: str, portal: str) -> str:
    """Log in to one target (if not logged in yet); its LUN 0's block device on the initiator."""
    out, rc = initiator.run(f"iscsiadm -m node -T {iqn} -p {portal} --login", timeout=120)
    assert rc in (0, SESSION_EXISTS), out
    link = f"/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-0"
    until(lambda: initiator.run(f"test -b {link}")[1] == 0, 60, f"{link} did not appear")
    return initiator.sh(f"readlink -f {link}").strip()


def logout_all(initiator: VM) -> None:
    initiator.run("iscsiadm -m node --logoutall=all")
    initiator.run("iscsiadm -m node -o delete")
