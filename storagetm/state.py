"""The run-state file: the view `storagetm status` and the screen show, and the secrets a
restart reuses (so connected initiators stay in). What storagetm made in the kernel is not
here: the ownership record (reconcile/journal.py) holds that, written ahead."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from msgspec import Struct, field, to_builtins
from msgspec.structs import fields, replace

from storagetm.backing.modes import Mode, SnapshotUsage
from storagetm.console.stats import DiskActivity
from storagetm.disks.disk import Disk
from storagetm.disks.identity import Identity, target_iqn
from storagetm.model import ISCSI_PORT, Backing, Export, HashProgress, IscsiConfig, Listener, WebConfig
from storagetm.security.auth import AuthConfig
from storagetm.security.chap import CHAP_USER
from storagetm.security.tls import TLSConfig
from storagetm.statefile import write_atomic
from storagetm.system.network import Address
from storagetm.web.links import urls

STATE_FILE = Path("/run/storagetm/state.json")
FORMAT = 1


@functools.lru_cache(maxsize=1024)
def _plain(value: Any) -> dict[str, Any]:
    """The JSON form of an immutable value, made once: the state is serialised every second
    for the dashboard, and a deep copy of every disk and identity was most of its CPU time.
    The dict is shared; nothing may change it."""
    plain: dict[str, Any] = to_builtins(value)
    return plain


class RunState(Struct):
    pid: int = 0
    nqn_base: str = ""
    ports: list[Listener] = field(default_factory=list)
    exports: dict[str, Export] = field(default_factory=dict)
    backings: dict[str, Backing] = field(default_factory=dict)
    snapshot_usage: dict[str, SnapshotUsage] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    not_exported: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    auth: AuthConfig = field(default_factory=AuthConfig)
    activity: dict[str, DiskActivity] = field(default_factory=dict)
    initiators: list[str] = field(default_factory=list)
    announced: str = ""  # the mDNS name the discovery service is announced under
    tls: TLSConfig = field(default_factory=TLSConfig)
    secure_boot: bool | None = None  # None: not booted with UEFI, or unknown
    alerts: list[str] = field(default_factory=list)  # bad options, each with what storagetm does instead
    refused: list[str] = field(default_factory=list)  # bad options for which nothing is exported
    iscsi: IscsiConfig = field(default_factory=IscsiConfig)
    web: WebConfig = field(default_factory=WebConfig)
    # NQN -> the disk's sha256 computed on the target: running, or done and the disk unchanged since.
    hashing: dict[str, HashProgress] = field(default_factory=dict)

    def without_secrets(self) -> RunState:
        """A copy for showing: the secrets and the TLS key replaced by a placeholder."""
        return replace(self, auth=self.auth.without_secrets(), tls=self.tls.without_secrets(),
                       iscsi=self.iscsi.without_secrets(), web=self.web.without_secrets())  # fmt: skip

    def iqn(self, export: Export) -> str:
        """The export's iSCSI target name; "" without iSCSI."""
        return target_iqn(self.iscsi.iqn_base, export.disk) if self.iscsi.enabled else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pid": self.pid,
            "nqn_base": self.nqn_base,
            "ports": [_plain(listener) for listener in self.ports],
            "exports": [self._export_json(nqn, exp) for nqn, exp in sorted(self.exports.items())],
            "addresses": [_plain(a) | {"connect": a.for_command} for a in self.addresses],
            "not_exported": self.not_exported,
            "problems": self.problems,
            "auth": self.auth._asdict() | {"hosts": list(self.auth.hosts), "enabled": self.auth.enabled},
            "initiators": self.initiators,
            "announced": self.announced,
            "tls": {"key": self.tls.key, "hosts": list(self.tls.hosts), "enabled": self.tls.enabled},
            "secure_boot": self.secure_boot,
            "alerts": self.alerts,
            "refused": self.refused,
            "iscsi": _plain(self.iscsi) | {"port": ISCSI_PORT, "chap": self.iscsi.chap,
                                           "chap_user": CHAP_USER if self.iscsi.chap else ""},
            "web": _plain(self.web) | {"urls": urls(self)},
        }

    def _export_json(self, nqn: str, export: Export) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nqn": nqn,
            "mode": export.mode.value,
            "snapshot_size": export.snapshot_size,
            "disk": _plain(export.disk),
            "identity": _plain(export.identity),
        }
        if self.iscsi.enabled:
            data["iqn"] = self.iqn(export)
        if nqn in self.backings:
            data["backing"] = _plain(self.backings[nqn])
        if nqn in self.activity:
            data["activity"] = to_builtins(self.activity[nqn])
        if nqn in self.snapshot_usage:
            data["snapshot_usage"] = to_builtins(self.snapshot_usage[nqn])
        if nqn in self.hashing:
            data["sha256"] = _plain(self.hashing[nqn])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown state format {data.get('format')!r}")
        disk_fields = {f.name for f in fields(Disk)}

        def disk(raw: dict[str, Any]) -> Disk:
            values = {k: v for k, v in raw.items() if k in disk_fields}
            values["by_id"] = tuple(values.get("by_id", ()))
            values["part_uuids"] = tuple(values.get("part_uuids", ()))
            return Disk(**values)

        def address(raw: dict[str, Any]) -> Address:
            return Address(raw["family"], raw["address"], raw["interface"], raw["link_local"])

        return cls(
            pid=int(data.get("pid", 0)),
            nqn_base=str(data.get("nqn_base", "")),
            ports=[Listener(p["adrfam"], p["traddr"], int(p["trsvcid"])) for p in data.get("ports", [])],
            exports={
                e["nqn"]: Export(
                    disk(e["disk"]),
                    Identity(**e["identity"]),
                    Mode(e.get("mode", "rw")),
                    int(e.get("snapshot_size", 0)),
                )  # fmt: skip
                for e in data.get("exports", [])
            },
            backings={e["nqn"]: Backing(**e["backing"]) for e in data.get("exports", []) if "backing" in e},
            snapshot_usage={
                e["nqn"]: SnapshotUsage(**e["snapshot_usage"]) for e in data.get("exports", []) if "snapshot_usage" in e
            },
            addresses=[address(a) for a in data.get("addresses", [])],
            not_exported=list(data.get("not_exported", [])),
            problems=list(data.get("problems", [])),
            alerts=list(data.get("alerts", [])),
            refused=list(data.get("refused", [])),
            iscsi=IscsiConfig(**{f.name: data.get("iscsi", {}).get(f.name, f.default) for f in fields(IscsiConfig)}),
            web=WebConfig(**{f.name: data.get("web", {}).get(f.name, f.default) for f in fields(WebConfig)}),
            hashing={e["nqn"]: HashProgress(**e["sha256"]) for e in data.get("exports", []) if "sha256" in e},
            initiators=list(data.get("initiators", [])),
            announced=str(data.get("announced", "")),
            secure_boot=data.get("secure_boot") if isinstance(data.get("secure_boot"), bool) else None,
            tls=TLSConfig(
                key=str(data.get("tls", {}).get("key", "")), hosts=tuple(data.get("tls", {}).get("hosts", ()))
            ),
            activity={e["nqn"]: DiskActivity(**e["activity"]) for e in data.get("exports", []) if "activity" in e},
            auth=AuthConfig(
                secret=str(data.get("auth", {}).get("secret", "")),
                ctrl_secret=str(data.get("auth", {}).get("ctrl_secret", "")),
                hosts=tuple(data.get("auth", {}).get("hosts", ())),
            ),
        )


def save(state: RunState, path: Path | None = None, unless: str = "") -> str:
    """Write atomically, unless the text is `unless` (what was written last: the dashboard
    republishes every second); return the text. The file holds the secrets: 0600 in 0700."""
    # One line: with `indent` the json module falls back to its pure-Python encoder.
    text = json.dumps(state.to_json())
    if text != unless:
        write_atomic(path or STATE_FILE, text.encode())
    return text


def load(path: Path | None = None) -> RunState | None:
    """The state a running (or killed) storagetm left, or None if there is none.
    PermissionError if it cannot be read: the file is root's."""
    try:
        text = (path or STATE_FILE).read_text()
    except PermissionError:
        raise
    except OSError:
        return None
    try:
        return RunState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError):
        return None


def running(path: Path | None = None) -> RunState | None:
    """The state of the storagetm that is running, or None if none is (a killed one's state
    stays behind for adoption). PermissionError if it cannot be read: the file is root's."""
    current = load(path)
    return current if current is not None and pid_alive(current.pid) else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
