"""iSCSI through the kernel's LIO: the objects an export needs, and their drivers.

Per export: a backstore on the device the backing layer made (iblock for a block device,
fileio for a file exported read-write as it is), with the disk's model and serial for
SCSI INQUIRY; a target named by its IQN; its portal group in demo mode (any initiator
name; with CHAP, only who has the secret); its LUN on the backstore; a network portal on
the wildcard address; and last the portal group's `enable`, so that an initiator finds
the LUN in place as soon as discovery lists the target. Shared: the two host bus adapters
the backstores sit on.

Demo mode: `generate_node_acls=1` gives every initiator a dynamic ACL, and CHAP for a
dynamic ACL comes from the portal group's own `auth/` (the kernel's iscsi_get_node_auth()
in iscsi_target_nego.c returns tpg_demo_auth for a dynamic ACL); `authentication=1` makes
the kernel refuse AuthMethod=None (iscsi_target_handle_csg_zero/one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from msgspec import Struct

from storagetm.backing.modes import Mode
from storagetm.disks.identity import target_iqn
from storagetm.fabrics.lio.configfs import Backstore, Root
from storagetm.model import ISCSI_PORT, Device, Export, Want
from storagetm.reconcile.objects import BaseDriver, Driver, Facts, FactsOf, Obj, make
from storagetm.security.chap import CHAP_USER
from storagetm.security.digest import sha256_hex

HBA, BACKSTORE, TARGET, TPG = "lio-hba", "lio-backstore", "iscsi-target", "iscsi-tpg"
LUN, PORTAL, ENABLE = "iscsi-lun", "iscsi-portal", "iscsi-enable"
# Ranks above nvmet's: on a hotplug every NVMe/TCP object goes first (a watching initiator
# connects at once; nvmet's hotplug latency stays as it was), then iSCSI's.
# A fixed adapter index, so its name is known before it is made: targetcli takes the lowest
# free index for each new storage object and does not come near it.
HBA_INDEX = 3260
VENDOR_MAX, PRODUCT_MAX, REVISION_MAX = 8, 16, 4  # SCSI INQUIRY's fields
SECRETS = ("password", "password_mutual")
# The portal group's login keys (RFC 7143 13), negotiated down to what the initiator offers.
# LIO's own defaults (MaxRecvDataSegmentLength 8 KiB, InitialR2T=Yes, 64 KiB first burst)
# split a 1 MiB write into 128 PDUs and make every burst wait for an R2T; open-iscsi offers
# 256 KiB segments, InitialR2T=No and a 256 KiB first burst, Microsoft's initiator 256 KiB
# segments and bursts with 64 KiB first bursts.
SESSION_PARAMS = (("MaxRecvDataSegmentLength", "262144"), ("MaxXmitDataSegmentLength", "262144"),
                  ("FirstBurstLength", "262144"), ("MaxBurstLength", "1048576"), ("InitialR2T", "No"),
                  ("ImmediateData", "Yes"))  # fmt: skip


def hba_name(plugin: str) -> str:
    return f"{plugin}_{HBA_INDEX}"


def portal_name(ipv6: bool, port: int = ISCSI_PORT) -> str:
    """LIO names a network portal `IP:PORT`, IPv6 in brackets; the IPv6 wildcard also takes
    IPv4 (a dual-stack socket)."""
    return f"[::]:{port}" if ipv6 else f"0.0.0.0:{port}"


def inquiry_names(model: str) -> tuple[str, str]:
    """(vendor, product) for SCSI INQUIRY from one model string, as ATA and NVMe disks give
    it ("WDC WD10EZEX-00BN5A0", "Samsung SSD 980 PRO 1TB"): a first word that fits the
    vendor field is the vendor. "" keeps LIO's own."""
    first, _, rest = model.partition(" ")
    if rest and len(first) <= VENDOR_MAX:
        return first, rest.strip()[:PRODUCT_MAX].rstrip()
    return "", model[:PRODUCT_MAX].rstrip()


def unit_serial(export: Export, iqn: str) -> str:
    """VPD page 0x80's serial, from which LIO makes the device's NAA WWN (page 0x83) out of
    the first 25 hex digits: the disk's serial, then a hash of the IQN, so that the WWN is
    stable and differs between disks whatever their serials hold."""
    digest = sha256_hex(f"storagetm-unit-serial:{iqn}")
    return f"{export.identity.serial}-{digest[:16]}" if export.identity.serial else digest[:32]


class IscsiFabric(Struct, frozen=True):
    root: Root
    name: str = "iscsi"

    def objects(self, want: Want, devices: Mapping[str, Device]) -> list[Obj]:
        if not (want.listen and want.iscsi.enabled):
            return []
        objs: list[Obj] = []
        hbas: dict[str, Obj] = {}
        for nqn, export in sorted(want.exports.items()):
            device = devices[nqn]
            plugin = "fileio" if export.disk.is_file and device.path == export.disk.devnode else "iblock"
            if plugin not in hbas:
                hbas[plugin] = make(HBA, hba_name(plugin))
                objs.append(hbas[plugin])
            objs += self._export(want, export, device, hbas[plugin])
        return objs

    def _export(self, want: Want, export: Export, device: Device, hba: Obj) -> list[Obj]:
        nqn, iscsi = export.nqn, want.iscsi
        iqn = target_iqn(iscsi.iqn_base, export.disk)
        vendor, product = inquiry_names(export.identity.model)
        backstore = make(BACKSTORE, f"{hba.name}/{iqn.rsplit('.', 1)[-1][:80]}", {
            "device": device.path, "size": str(export.disk.size), "vendor_id": vendor, "product_id": product,
            "revision": export.identity.firmware[:REVISION_MAX], "unit_serial": unit_serial(export, iqn)},
            needs=(hba.key, *([device.made_by] if device.made_by else [])), group=nqn)  # fmt: skip
        target = make(TARGET, iqn, group=nqn)
        auth = {"authentication": "1" if iscsi.chap else "0",
                "write_protect": "1" if export.mode is Mode.READ_ONLY else "0"}  # fmt: skip
        if iscsi.chap:
            auth |= {"userid": CHAP_USER, "password": iscsi.chap_secret}
        if iscsi.chap_ctrl_secret:
            auth |= {"userid_mutual": CHAP_USER, "password_mutual": iscsi.chap_ctrl_secret}
        tpg = make(TPG, iqn, auth, needs=(target.key,), group=nqn, secret=SECRETS)
        lun = make(LUN, iqn, {"backstore": backstore.name}, needs=(tpg.key, backstore.key), group=nqn)
        portal = make(PORTAL, f"{iqn} {portal_name(want.ipv6)}", needs=(tpg.key,), group=nqn)
        enable = make(ENABLE, iqn, needs=(lun.key, portal.key), group=nqn)
        return [backstore, target, tpg, lun, portal, enable]

    def drivers(self) -> Sequence[Driver]:
        root = self.root
        return (HbaDriver(root), BackstoreDriver(root), TargetDriver(root), TpgDriver(root), LunDriver(root),
                PortalDriver(root), EnableDriver(root))  # fmt: skip


def _split(name: str) -> tuple[str, str]:
    """`HBA/NAME` of a backstore, `IQN PORTAL` of a portal."""
    first, _, second = name.replace("/", " ", 1).partition(" ")
    return first, second


class _LioDriver(BaseDriver):
    def __init__(self, root: Root) -> None:
        self.root = root


class HbaDriver(_LioDriver):
    kind, rank = HBA, 81

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.hba(obj.name).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        self.root.create_hba(obj.name)
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.hba(obj.name).delete()


class BackstoreDriver(_LioDriver):
    kind, rank = BACKSTORE, 84

    def _backstore(self, obj: Obj) -> Backstore:
        hba, name = _split(obj.name)
        return self.root.hba(hba).backstore(name)

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self._backstore(obj).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        hba, name = _split(obj.name)
        backstore = self.root.hba(hba).create_backstore(name)
        try:
            if hba.startswith("fileio_"):
                backstore.configure(f"fd_dev_name={obj.attr('device')},fd_dev_size={obj.attr('size')}")
            else:
                backstore.configure(f"udev_path={obj.attr('device')}")
            backstore.enable()
            # INQUIRY's names, before any LUN exports it (the kernel refuses them after).
            for attr in ("vendor_id", "product_id", "revision"):
                if obj.attr(attr):
                    backstore.set("wwn", attr, obj.attr(attr))
            backstore.set("wwn", "vpd_unit_serial", obj.attr("unit_serial"))
        except BaseException:
            backstore.delete()
            raise
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self._backstore(obj).delete()


class TargetDriver(_LioDriver):
    kind, rank = TARGET, 82

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.target(obj.name).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        self.root.create_target(obj.name)
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.target(obj.name).delete()


class TpgDriver(_LioDriver):
    """The portal group, in demo mode, not yet enabled (EnableDriver does that last)."""

    kind, rank = TPG, 83

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.target(obj.name).tpg().exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        tpg = self.root.target(obj.name).create_tpg()
        try:
            for name, value in (("generate_node_acls", "1"), ("cache_dynamic_acls", "1"),
                                ("demo_mode_write_protect", obj.attr("write_protect")),
                                ("authentication", obj.attr("authentication"))):  # fmt: skip
                tpg.set("attrib", name, value)
            for name in ("userid", "password", "userid_mutual", "password_mutual"):
                if obj.attr(name):
                    tpg.set("auth", name, obj.attr(name), secret=name in SECRETS)
            # authentication=1 already drops None from AuthMethod in the kernel; said again here.
            tpg.set("param", "AuthMethod", "CHAP" if obj.attr("authentication") == "1" else "CHAP,None")
            for name, value in SESSION_PARAMS:
                tpg.set("param", name, value)
        except BaseException:
            tpg.delete()
            raise
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.target(obj.name).tpg().delete()


class LunDriver(_LioDriver):
    kind, rank = LUN, 85

    def present(self, obj: Obj, facts: Facts) -> bool:
        return self.root.target(obj.name).tpg().lun().exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        hba, name = _split(obj.attr("backstore"))
        lun = self.root.target(obj.name).tpg().create_lun()
        try:
            lun.link(self.root.hba(hba).backstore(name))
        except BaseException:
            lun.delete()
            raise
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        self.root.target(obj.name).tpg().lun().delete()


class PortalDriver(_LioDriver):
    kind, rank = PORTAL, 86

    def present(self, obj: Obj, facts: Facts) -> bool:
        iqn, portal = _split(obj.name)
        return self.root.target(iqn).tpg().portal(portal).exists()

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        iqn, portal = _split(obj.name)
        self.root.target(iqn).tpg().create_portal(portal)
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        iqn, portal = _split(obj.name)
        self.root.target(iqn).tpg().remove_portal(portal)


class EnableDriver(_LioDriver):
    """The portal group's `enable`: logins are taken from here on; disabled first on the way
    out, which also ends the sessions logged in."""

    kind, rank = ENABLE, 90

    def present(self, obj: Obj, facts: Facts) -> bool:
        tpg = self.root.target(obj.name).tpg()
        return tpg.exists() and tpg.enabled

    def foreign(self, obj: Obj) -> bool:
        return False  # the portal group is ours (its own object): another program's would have failed there

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        self.root.target(obj.name).tpg().enable()
        return {}

    def remove(self, obj: Obj, facts: Facts) -> None:
        tpg = self.root.target(obj.name).tpg()
        if tpg.exists():
            tpg.enable(False)
