"""`storagetm targets | connect | copy | disconnect | decode`: the other machine's commands.

What only some commands use (the connection code, mDNS, ipaddress) is imported by them:
`copy` needs none of it and starts sooner without (under emulation start-up is a large part
of a short copy's time). Target is a NamedTuple rather than a dataclass for the same reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from storagetm.errors import ExitCode, StorageTMError, UsageError
from storagetm.initiator import fabrics, record
from storagetm.initiator.copy import Copier, Source
from storagetm.protocol import DISCOVERY_NQN, DISCOVERY_TRSVCID
from storagetm.text import human_size

if TYPE_CHECKING:
    from storagetm import connection

MODE_NOTE = "mode (read-write, read-only, snapshot): shown on the target's screen, not announced"


class Target(NamedTuple):
    """A target to talk to: its name, where to reach it, and the credentials from its code."""

    name: str
    addresses: tuple[str, ...]
    port: int
    code: connection.ConnectionCode | None = None
    txt: Mapping[str, str] = MappingProxyType({})  # a NamedTuple's default is shared: one nobody can change

    @property
    def credentials(self) -> fabrics.Credentials:
        code = self.code
        if code is None:
            return fabrics.Credentials()
        return fabrics.Credentials(code.host_nqn, code.secret, code.ctrl_secret, bool(code.tls_key))


def decode_code(text: str) -> connection.ConnectionCode:
    from storagetm import connection

    try:
        return connection.decode(text)
    except ValueError as exc:
        raise UsageError(str(exc), hint="copy the code again from the target's screen") from None


def _is_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True


def given(spec: str | None) -> str | None:
    """`-`: the code from standard input; `@FILE`: from FILE. Either keeps the code, with
    its secrets, off the command line, which every user of this machine can read."""
    if spec == "-":
        return sys.stdin.readline().strip()
    if spec and spec.startswith("@"):
        try:
            return Path(spec[1:]).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the connection code from {spec[1:]}: {exc.strerror or exc}") from None
    return spec


def choose_target(spec: str | None, port: int | None) -> Target:
    """A code, an address, an announced name, or (none given) the one target announced."""
    from storagetm import connection
    from storagetm.initiator import mdns

    spec = given(spec)
    if spec and connection.looks_like_code(spec):
        code = decode_code(spec)
        return Target(code.addresses[0], code.addresses, port or code.port, code)
    if spec and _is_address(spec):
        address = spec.split("%")[0]
        return Target(address, (address,), port or DISCOVERY_TRSVCID)
    announced = mdns.browse()
    if spec:
        wanted = spec.removesuffix(".local")
        announced = [a for a in announced if a.name == wanted or a.host.removesuffix(".local") == wanted]
        if not announced:
            raise UsageError(f"no target {spec!r} is announced on the local links",
                             hint="see `storagetm targets`, or give its address or connection code")  # fmt: skip
    if not announced:
        raise UsageError("no storagetm target found on the local links (mDNS)",
                         hint="is the cable in and the target's screen up? Or give its address or connection code")
    if len(announced) > 1:
        names = ", ".join(a.host for a in announced)
        raise UsageError(f"several targets are announced: {names}", hint="name one: storagetm connect NAME")
    found = announced[0]
    return Target(found.host, found.addresses, port or found.port, None, found.txt)


def _prepare(target: Target, command: str) -> None:
    fabrics.require_root(command)
    fabrics.require_nvme_cli()
    fabrics.require_nvme_tcp()
    if target.code is not None and target.code.tls_key:
        from storagetm.security import tls

        tls.ensure_handshake_daemon()
        tls.insert_key(target.code.host_nqn, DISCOVERY_NQN, target.code.tls_key)


def discover(target: Target) -> tuple[fabrics.Endpoint, list[fabrics.Record]]:
    """The first of the target's endpoints that answers, and its subsystems."""
    problems: list[str] = []
    for address in target.addresses:
        candidates = fabrics.endpoints(address, target.port)
        if not candidates:
            problems.append(f"{address}: no interface is up with an fe80:: address to reach it")
        for endpoint in candidates:
            try:
                return endpoint, fabrics.discover(endpoint, target.credentials)
            except fabrics.FabricsError as exc:
                problems.append(exc.message)
    hint = "is storagetm running there, and the cable in?"
    if target.code is not None and target.code.tls_key:
        hint += " With TLS: is tlshd running here, and the code from the target's current start?"
    raise fabrics.FabricsError("cannot reach the target: " + "; ".join(problems), hint=hint)


def _disk_line(ns: fabrics.Namespace) -> str:
    return f"{ns.device}  {ns.model}  {ns.serial}  {human_size(ns.size)}"


def targets(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm targets", description="Find storagetm targets on the local links.")
    parser.add_argument("code", nargs="?", help="a connection code (- reads it from stdin, @FILE from FILE): "
                        "list that target, through TLS if it has a key")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from storagetm.initiator import mdns

    if text := given(args.code):
        code = decode_code(text)
        found = [Target(code.addresses[0], code.addresses, code.port, code)]
    else:
        found = [Target(a.host, a.addresses, a.port, None, a.txt) for a in mdns.browse()]
    can_discover = os.geteuid() == 0 and shutil.which("nvme") is not None
    local = {ns.nqn: ns for ns in fabrics.connected()}
    rows: list[dict[str, object]] = []
    for target in found:
        row: dict[str, object] = {"name": target.name, "addresses": list(target.addresses), "port": target.port,
                                  "disks": [], "mode": MODE_NOTE}  # fmt: skip
        if can_discover:
            try:
                _prepare(target, "targets")
                _, records = discover(target)
                row["tls"] = any(r.tls for r in records)
                row["disks"] = [_disk_row(r, local.get(r.nqn)) for r in records]
            except StorageTMError as exc:
                row["problem"] = exc.one_line()
        else:
            row["problem"] = "disks not listed: run as root, with nvme-cli installed"
        rows.append(row)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return ExitCode.OK
    if not rows:
        print("No storagetm target found on the local links.")
    for row in rows:
        print(f"{row['name']}  port {row['port']}  {'TLS' if row.get('tls') else ''}".rstrip())
        print(f"  addresses: {', '.join(row['addresses'])}")  # type: ignore[arg-type]
        print(f"  {MODE_NOTE}")
        for disk in row["disks"]:  # type: ignore[attr-defined]
            print(f"  {disk['nqn']}")
            print(f"    {disk['what']}")
        if "problem" in row:
            print(f"  {row['problem']}")
    return ExitCode.OK


def disk_identity(nqn: str) -> str:
    """The disk's identity in a storagetm NQN (model-serial, WWN or slot), after the last dot."""
    return nqn.rsplit(".", 1)[-1] if "storagetm" in nqn else nqn


def _disk_row(rec: fabrics.Record, ns: fabrics.Namespace | None) -> dict[str, object]:
    row: dict[str, object] = {"nqn": rec.nqn, "identity": disk_identity(rec.nqn), "tls": rec.tls}
    if ns is not None:
        row |= {"device": ns.device, "model": ns.model, "serial": ns.serial, "size": ns.size}
        row["what"] = f"connected: {_disk_line(ns)}"
    else:
        row["what"] = f"{disk_identity(rec.nqn)} (model, serial and size once connected: storagetm connect)"
    return row


def connect(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm connect", description="Connect a target's disks.")
    parser.add_argument("target", nargs="?", help="connection code (- reads it from stdin, @FILE from FILE), mDNS "
                        "name or address (default: the one target announced)")  # fmt: skip
    parser.add_argument("--disk", action="append", default=[], help="only disks whose NQN contains this (repeatable)")
    parser.add_argument("--port", type=int, help="the target's port (default: the code's, or 8009)")
    args = parser.parse_args(argv)
    fabrics.require_root("connect")
    target = choose_target(args.target, args.port)
    _prepare(target, "connect")
    endpoint, records = discover(target)
    chosen = [r for r in records if not args.disk or any(d in r.nqn for d in args.disk)]
    if not chosen:
        raise UsageError(f"the target offers no disk{' matching ' + ', '.join(args.disk) if args.disk else ''}",
                         hint="see `storagetm targets`")  # fmt: skip
    connections = record.load()
    for rec in chosen:
        present = fabrics.controllers(rec.nqn)
        if any(state == "live" for _, state in present):
            continue
        # Controllers still trying to reach a target that restarted (with new secrets, after
        # a clean stop): they never will; this connection replaces them.
        for name, _ in present:
            fabrics.delete_controller(name)
        connections = [c for c in connections if c.controller not in {name for name, _ in present}]
        if target.code is not None and target.code.tls_key:
            from storagetm.security import tls

            tls.insert_key(target.code.host_nqn, rec.nqn, target.code.tls_key)
        disk_endpoint = fabrics.Endpoint(endpoint.address, rec.port or endpoint.port, endpoint.interface)
        controller = fabrics.connect(disk_endpoint, rec.nqn, target.credentials)
        connections.append(record.Connection(controller, rec.nqn, target.name, endpoint.address))
        record.save(connections)
    namespaces = {ns.nqn: ns for ns in fabrics.wait_namespaces([r.nqn for r in chosen])}
    for rec in chosen:
        ns = namespaces.get(rec.nqn)
        print(f"{_disk_line(ns)}  {rec.nqn}" if ns else f"(no namespace yet)  {rec.nqn}")
    return ExitCode.OK if len(namespaces) == len(chosen) else ExitCode.FAILURE


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "disk"


def resolve_disk(spec: str, namespaces: list[fabrics.Namespace]) -> fabrics.Namespace:
    """/dev/nvmeXnY, nvmeXnY, an NQN, or a part of one (the disk's identity, its serial)."""
    device = spec if spec.startswith("/dev/") else f"/dev/{spec}"
    for ns in namespaces:
        if spec in (ns.device, ns.nqn) or device == ns.device:
            return ns
    if os.path.exists(device) and os.path.realpath(device) in {ns.device for ns in namespaces}:
        return next(ns for ns in namespaces if ns.device == os.path.realpath(device))
    matches = [ns for ns in namespaces if spec in ns.nqn or spec == ns.serial]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no connected NVMe-oF disk {spec!r}", hint="connect first: storagetm connect; "
                         "then give the /dev/nvmeXnY it printed")  # fmt: skip
    raise UsageError(f"{spec!r} names several disks: {', '.join(ns.device for ns in matches)}",
                     hint="give the /dev/nvmeXnY")  # fmt: skip


def copy(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm copy", description="Copy a connected disk, resumable, verified.")
    parser.add_argument("disk", nargs="?", help="/dev/nvmeXnY (as `storagetm connect` printed), or its NQN")
    parser.add_argument("dest", nargs="?", help="a file (written sparse) or a block device at least as large")
    parser.add_argument("--all", metavar="DIR", help="copy every connected storagetm disk into DIR")
    parser.add_argument("--no-verify", action="store_true", help="skip reading both again to compare them")
    args = parser.parse_args(argv)
    if bool(args.all) == bool(args.disk and args.dest) or (args.all and args.disk):
        raise UsageError("give DISK DEST, or --all DIR", hint="e.g. storagetm copy /dev/nvme1n1 laptop.img")
    fabrics.require_root("copy")
    namespaces = fabrics.connected()
    if args.all:
        ours = {c.nqn for c in record.load()}
        jobs = [(ns, Path(args.all) / f"{_safe_name(disk_identity(ns.nqn))}.img") for ns in namespaces
                if ns.nqn in ours or "storagetm" in ns.nqn]  # fmt: skip
        if not jobs:
            raise UsageError("no storagetm disk is connected", hint="connect first: storagetm connect")
    else:
        jobs = [(resolve_disk(args.disk, namespaces), Path(args.dest))]
    failed = False
    for ns, dest in jobs:
        verdict = Copier(Source(ns.device, ns.nqn, ns.size), dest).run(verify=not args.no_verify)
        print(f"{ns.device} -> {dest}: {verdict}" if args.all else verdict, flush=True)
        failed = failed or verdict.startswith("differ")
    return ExitCode.FAILURE if failed else ExitCode.OK


def disconnect(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm disconnect", description="Disconnect what connect connected.")
    parser.add_argument("target", nargs="?", help="only this target (its name, address or a disk's NQN)")
    args = parser.parse_args(argv)
    fabrics.require_root("disconnect")
    kept: list[record.Connection] = []
    gone = 0
    for conn in record.load():
        if args.target and args.target not in (conn.target, conn.address, conn.nqn):
            kept.append(conn)
            continue
        if fabrics.controller_nqn(conn.controller) == conn.nqn:  # not a later controller under a reused name
            fabrics.delete_controller(conn.controller)
            gone += 1
    record.save(kept)
    print(f"disconnected {gone} disk{'s' if gone != 1 else ''}")
    return ExitCode.OK


def decode(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm decode", description="Show what a connection code holds.")
    parser.add_argument("code", nargs="+", help="the code (spaces and line breaks are fine; - reads it from "
                        "stdin, @FILE from FILE)")  # fmt: skip
    parser.add_argument("--show-secrets", action="store_true")
    args = parser.parse_args(argv)
    from storagetm.security.keys import HIDDEN

    code = decode_code(given(args.code[0]) or "" if len(args.code) == 1 else " ".join(args.code))
    shown = {"addresses": list(code.addresses), "port": code.port, "host_nqn": code.host_nqn}
    for name in ("secret", "ctrl_secret", "tls_key"):
        value = getattr(code, name)
        shown[name] = value if args.show_secrets or not value else HIDDEN
    json.dump(shown, sys.stdout, indent=1)
    print()
    return ExitCode.OK


COMMANDS = {"targets": targets, "connect": connect, "copy": copy, "disconnect": disconnect, "decode": decode}


def run(argv: Sequence[str]) -> int:
    """argv[0] names the command; StorageTMError reaches storagetm.cli.main, which prints it."""
    return COMMANDS[argv[0]](argv[1:])
