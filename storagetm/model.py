"""The values every part shares, and the protocol constants: what an export is, which
ports there are, what is wanted. Importing this pulls in no kernel code, so the screen,
`storagetm status` and the web page can use it without the reconciler."""

from __future__ import annotations

from msgspec import Struct, field
from msgspec.structs import replace

from storagetm.backing.modes import Mode
from storagetm.disks.disk import Disk
from storagetm.disks.identity import Identity
from storagetm.protocol import DISCOVERY_NQN as DISCOVERY_NQN  # the engine's modules take them from here
from storagetm.protocol import DISCOVERY_TRSVCID as DISCOVERY_TRSVCID
from storagetm.protocol import IO_TRSVCID as IO_TRSVCID
from storagetm.security import keys
from storagetm.security.auth import AuthConfig
from storagetm.security.tls import TLSConfig
from storagetm.system.network import Address

NSID = 1
ISCSI_PORT = 3260  # iSCSI's well-known port; Windows' Quick Connect asks there


class Export(Struct, frozen=True):
    """One disk to export, with the identity the initiator will see."""

    disk: Disk
    identity: Identity
    mode: Mode = Mode.READ_WRITE
    snapshot_size: int = 0  # copy-on-write store limit in snapshot mode; 0: the default, as RAM allows

    @property
    def nqn(self) -> str:
        return self.identity.nqn

    @property
    def backing_key(self) -> tuple[str, int, int, Mode, int]:
        """What the device the backing layer makes for it depends on: udev's names or a
        label arriving after the export change none of it."""
        return self.disk.devnode, self.disk.devnum, self.disk.size, self.mode, self.snapshot_size


class Listener(Struct, frozen=True):
    """One TCP listening address: family, address (a wildcard, or one of the target's, with
    its zone if link-local) and service id (port)."""

    adrfam: str  # "ipv4" or "ipv6"
    traddr: str  # "0.0.0.0", "::", "169.254.1.2", "fe80::1%eth0"
    trsvcid: int


def wildcard(ipv6: bool, trsvcid: int) -> Listener:
    """An IPv6 wildcard also accepts IPv4 (dual-stack socket), and an IPv4 and an IPv6
    wildcard on the same TCP port cannot both bind: one listener per port."""
    return Listener("ipv6", "::", trsvcid) if ipv6 else Listener("ipv4", "0.0.0.0", trsvcid)


class IscsiConfig(Struct, frozen=True):
    """The second fabric: every export also an iSCSI target (kernel LIO), for initiators
    without NVMe/TCP (Windows). With `chap_secret`, a login needs CHAP with it; with
    `chap_ctrl_secret` too, the target proves itself (mutual CHAP) when the initiator asks."""

    enabled: bool = False
    iqn_base: str = ""  # iqn.2023-10.io.systemd.storagetm:<host id>; each target is IQN_BASE.<disk identity>
    chap_secret: str = ""
    chap_ctrl_secret: str = ""
    unavailable: str = ""  # why iSCSI is not offered although it was asked for (no LIO in this kernel)

    @property
    def chap(self) -> bool:
        return bool(self.chap_secret)

    def without_secrets(self) -> IscsiConfig:
        return replace(self, chap_secret=keys.hidden(self.chap_secret),
                       chap_ctrl_secret=keys.hidden(self.chap_ctrl_secret))  # fmt: skip


class Want(Struct, frozen=True):
    """Everything the exports should be, as one value: the input of the desired state."""

    exports: dict[str, Export] = field(default_factory=dict)  # by NQN
    nqn_base: str = ""
    io_port: int = IO_TRSVCID
    ipv6: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    addresses: tuple[Address, ...] = ()  # the target's: one discovery port on each
    listen: bool = True  # False while a bad option refuses every export: nothing listens either
    iscsi: IscsiConfig = field(default_factory=IscsiConfig)

    @property
    def io_listener(self) -> Listener:
        return wildcard(self.ipv6, self.io_port)

    @property
    def discovery_listeners(self) -> list[Listener]:
        """Port 8009 serves discovery only (unless it is the I/O port too), on each of the
        target's addresses by itself: its referral can then name the address asked."""
        if self.io_port == DISCOVERY_TRSVCID:
            return []
        return [Listener(address.family, address.bindable, DISCOVERY_TRSVCID)
                for address in self.addresses if self.ipv6 or address.family == "ipv4"]  # fmt: skip

    @property
    def listeners(self) -> list[Listener]:
        return [self.io_listener, *self.discovery_listeners]


class Device(Struct, frozen=True):
    """The block device (or file) a fabric exports for one disk, and the backing object
    that makes it (None: the disk itself)."""

    path: str
    made_by: tuple[str, str] | None = None


class Backing(Struct, frozen=True):
    """What `storagetm status` shows of the device an export is offered on."""

    path: str
    dm_name: str = ""
    store: str = ""  # the snapshot store's own tmpfs


WEB_PORT = 80


class WebConfig(Struct, frozen=True):
    """The web page, as the screen and `storagetm status` show it. `port` 0: not serving."""

    port: int = 0
    token: str = ""  # "" while anyone may connect; else asked for by every page and download
    downloads: bool = True  # the disks as downloads; not with TLS on unless asked for (plain HTTP)

    def without_secrets(self) -> WebConfig:
        return replace(self, token=keys.hidden(self.token))


class HashProgress(Struct, frozen=True):
    """A disk's sha256 computed on the target, as the screen, `storagetm status` and
    status.json show it: running (`done` of `size` bytes), or finished with its digest or
    why there is none."""

    done: int  # bytes hashed so far
    size: int
    digest: str = ""
    error: str = ""

    @property
    def finished(self) -> bool:
        return bool(self.digest or self.error)

    @property
    def fraction(self) -> float:
        return 1.0 if self.digest else min(1.0, self.done / self.size) if self.size else 0.0
