"""Stable names: NQNs, namespace UUID/NGUID, and the model/serial the initiator sees.

An NQN is derived from a stable host identity and the disk's own identity (WWN,
or model + serial, or its by-path slot), never from the kernel name, so it survives
reboots, re-plugging and `sda` becoming `sdb`.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from msgspec import Struct
from msgspec.structs import replace

from storagetm.disks.disk import Disk
from storagetm.errors import UsageError
from storagetm.security.digest import sha256_hex, uuid5

NQN_MAX = 223  # bytes, nvmet's NVMF_NQN_SIZE
# Bytes kept for ".<disk identity>": readable identities up to 79 bytes; a longer one becomes a
# 32-digit hash (subsystem_nqn), which always fits.
IDENTITY_ROOM = 80
PREFIX_MAX = NQN_MAX - IDENTITY_ROOM
DEFAULT_NQN_BASE = "nqn.2023-10.io.systemd:storagetm"
# iSCSI names (RFC 3720 3.2.6): `iqn.YYYY-MM.reversed.domain[:unique]`, lower case, at most
# 223 bytes; the unique part from the same host and disk identity as the NQN.
IQN_PREFIX = "iqn.2023-10.io.systemd.storagetm"
IQN_MAX = 223
MODEL_MAX, SERIAL_MAX, FIRMWARE_MAX = 40, 20, 8
_NQN_RE = re.compile(r"^nqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9][a-z0-9.-]*[a-z0-9](:[^\s\x00-\x1f\x7f-\x9f]*)?$")
_BOGUS_DMI = {"", "none", "default string", "to be filled by o.e.m.", "not specified",
              "system serial number", "0123456789", "not applicable"}  # fmt: skip
_UUID_NAMESPACE = uuid.UUID("4f1d6a40-4f5e-4c5b-9d55-73746f726167")


def valid_nqn(nqn: str) -> bool:
    """The NVMe form, at most 223 bytes, and usable as a configfs directory name (no `/`)."""
    return len(nqn.encode()) <= NQN_MAX and "/" not in nqn and _NQN_RE.fullmatch(nqn) is not None


_PLAIN_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


def nvme_form(prefix: str) -> bool:
    """Whether a prefix is of the NVMe form. systemd-storagetm takes any name (its own test
    passes `--nqn=quux`), and so does Linux's initiator; other initiators may not."""
    return _NQN_RE.fullmatch(prefix) is not None


def check_nqn_prefix(prefix: str) -> str:
    """A prefix that leaves room in nvmet's 223 bytes for `.<disk identity>` (IDENTITY_ROOM):
    of the NVMe form, or a plain name as upstream accepts (`quux`)."""
    hint = "use the form nqn.YYYY-MM.reverse.domain[:name], e.g. nqn.2024-01.com.example:lab"
    if "/" in prefix:
        raise UsageError(f"invalid NQN prefix {prefix!r}: '/' cannot be in an NQN (nvmet names directories "
                         "after NQNs)", hint=hint)  # fmt: skip
    if any(char in prefix for char in "\n\r\t"):
        raise UsageError(f"invalid NQN prefix {prefix!r}: it holds a newline or tab", hint=hint)
    size = len(prefix.encode())
    if size > PREFIX_MAX:
        raise UsageError(
            f"NQN prefix is {size} bytes, at most {PREFIX_MAX} fit: each disk's NQN is PREFIX.<disk identity> "
            f"and nvmet takes at most {NQN_MAX} bytes",
            hint="use a shorter prefix, e.g. nqn.2024-01.com.example:lab",
        )
    if not (nvme_form(prefix) or _PLAIN_PREFIX_RE.fullmatch(prefix)):
        raise UsageError(f"invalid NQN prefix {prefix!r}", hint=hint)
    return prefix


def _meaningful(value: str) -> bool:
    v = value.strip().lower()
    if v in _BOGUS_DMI:
        return False
    digits = set(v) - {"-", " "}
    return digits not in ({"0"}, {"f"}, set())


def host_identity(dmi: Path = Path("/sys/class/dmi/id"), machine_id: Path = Path("/etc/machine-id")) -> str:
    """A string that identifies this machine across reboots of a RAM-only image."""
    for name in ("product_uuid", "product_serial", "board_serial"):
        try:
            value = (dmi / name).read_text().strip()
        except OSError:
            continue
        if _meaningful(value):
            return f"{name}:{value.lower()}"
    try:
        return "machine-id:" + machine_id.read_text().strip()
    except OSError:
        return "unknown"


def host_id(identity: str) -> str:
    return sha256_hex(f"storagetm-host:{identity}")[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def disk_slug(disk: Disk) -> str:
    """The disk's own identity as an NQN-safe word."""
    if disk.is_file:
        return "file-" + _slug(disk.name)[:40] + "-" + sha256_hex(disk.devnode)[:8]
    if disk.serial:
        slug = (_slug(disk.model)[:40] + "-" + _slug(disk.serial)[:40]).strip("-")
        nsid = re.fullmatch(r"nvme\d+n(\d+)", disk.name)
        # One NVMe controller (one serial) can carry several namespaces.
        return f"{slug}-n{nsid.group(1)}" if nsid else slug
    if disk.wwn:
        return _slug(disk.wwn)[:64]
    if disk.by_path:
        return "path-" + _slug(disk.by_path.removeprefix("/dev/disk/by-path/"))[:80]
    return "name-" + _slug(disk.name)


def default_nqn_base(identity: str) -> str:
    return f"{DEFAULT_NQN_BASE}.{host_id(identity)}"


def _disk_name(base: str, disk: Disk, limit: int) -> str:
    """BASE.<disk identity>, or BASE.<32-digit hash> if that would pass `limit` bytes."""
    name = f"{base}.{disk_slug(disk)}"
    if len(name.encode()) > limit:
        name = f"{base}.{sha256_hex(name)[:32]}"
    return name


def subsystem_nqn(base: str, disk: Disk) -> str:
    return _disk_name(base, disk, NQN_MAX)


def iqn_base(host: str) -> str:
    """`host`: host_id() of this machine, as in the default NQN prefix."""
    return f"{IQN_PREFIX}:{host}"


def target_iqn(base: str, disk: Disk) -> str:
    """The disk's iSCSI target name: stable as its NQN, whatever prefix the NQNs take."""
    return _disk_name(base, disk, IQN_MAX)


def _ascii(text: str, limit: int) -> str:
    clean = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).strip()
    return clean[:limit].rstrip()


class Identity(Struct, frozen=True):
    """What the initiator sees of one exported disk."""

    nqn: str
    uuid: str
    nguid: str
    model: str
    serial: str
    firmware: str


class NvmeOverrides(Struct, frozen=True):
    """What the initiator sees instead of a disk's own model, firmware, serial and namespace
    UUID: systemd-storagetm's $SYSTEMD_NVME_MODEL, _FIRMWARE, _SERIAL and _UUID. "" keeps the
    disk's own."""

    model: str = ""
    firmware: str = ""
    serial: str = ""
    uuid: str = ""

    def shared(self) -> NvmeOverrides:
        """Only what several disks may share: serials and UUIDs must stay unique."""
        return replace(self, serial="", uuid="")


NO_OVERRIDES = NvmeOverrides()


ENVIRONMENT = {"model": "SYSTEMD_NVME_MODEL", "firmware": "SYSTEMD_NVME_FIRMWARE", "serial": "SYSTEMD_NVME_SERIAL",
               "uuid": "SYSTEMD_NVME_UUID"}  # fmt: skip


def nvme_overrides(environ: Mapping[str, str]) -> tuple[NvmeOverrides, list[str]]:
    """The overrides the environment sets, and a warning for each it sets wrong. As upstream,
    a UUID that does not parse (or is all zeros) is ignored: the disk keeps its own."""
    values = {field: environ.get(name, "") for field, name in ENVIRONMENT.items()}
    warnings: list[str] = []
    if values["uuid"]:
        try:
            parsed = uuid.UUID(values["uuid"])
        except ValueError:
            parsed = uuid.UUID(int=0)
        if parsed.int == 0:
            warnings.append(f"${ENVIRONMENT['uuid']}={values['uuid'][:40]!r} is not a UUID, ignoring")
        values["uuid"] = str(parsed) if parsed.int else ""
    return NvmeOverrides(**values), warnings


@functools.lru_cache(maxsize=1024)  # plan() asks again for every disk on each udev event
def identity_for(base: str, disk: Disk, overrides: NvmeOverrides = NO_OVERRIDES) -> Identity:
    nqn = subsystem_nqn(base, disk)
    ns_uuid = overrides.uuid or str(uuid5(_UUID_NAMESPACE, nqn))
    nguid = sha256_hex(f"storagetm-nguid:{nqn}")[:32]
    return Identity(
        nqn=nqn,
        uuid=ns_uuid,
        nguid=f"{nguid[0:8]}-{nguid[8:12]}-{nguid[12:16]}-{nguid[16:20]}-{nguid[20:32]}",
        model=_ascii(overrides.model or disk.model or "storagetm disk", MODEL_MAX),
        serial=_ascii(overrides.serial or disk.serial, SERIAL_MAX),
        firmware=_ascii(overrides.firmware, FIRMWARE_MAX),
    )
