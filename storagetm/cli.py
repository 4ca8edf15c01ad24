"""The storagetm command: a drop-in for systemd-storagetm's options, plus status/stop."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from storagetm import __version__, state
from storagetm.auth import secret_argument
from storagetm.daemon import Daemon, explicit_files, plan
from storagetm.disks import resolve_file
from storagetm.errors import ExitCode, NotRunningError, StorageTMError, UsageError
from storagetm.identity import check_nqn_prefix, default_nqn_base, host_identity, valid_nqn
from storagetm.keys import HIDDEN, ON_COMMAND_LINE, on_command_line
from storagetm.memory import check_system_complete
from storagetm.policy import held_by_another, system_facts
from storagetm.screen import Screen, active_consoles, human_size, render
from storagetm.settings import (
    KERNEL_OPTIONS,
    OptionError,
    Settings,
    apply_kernel_cmdline,
    parse_modes,
    parse_port,
    parse_snapshot_size,
    read_kernel_cmdline,
)
from storagetm.text import PrintableLogFilter, printable
from storagetm.tls import key_argument
from storagetm.udev import BlockDevices

log = logging.getLogger("storagetm")

EPILOG = """\
subcommands:
  storagetm status [--json] [--show-secrets]   show what a running storagetm exports
  storagetm stop                               stop it (its exports are torn down)

secrets: --dhchap-secret=@FILE, --tls-key=@FILE or the systemd credentials storagetm.*
         keep them off the command line, which every user can read

exit codes: 0 ok, 1 failure, 2 usage error (or not root), 3 kernel lacks nvmet/configfs,
            4 no storagetm running, 6 the system did not fit in RAM
"""


def _port(value: str) -> int:
    try:
        return parse_port(value)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, not {value!r}") from exc


def _nqn(value: str) -> str:
    try:
        return check_nqn_prefix(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.one_line()) from exc


def _argument(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a check that raises UsageError: its one line becomes the error."""

    def convert(value: str) -> str:
        try:
            return check(value)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(exc.one_line()) from exc

    return convert


_secret = _argument(secret_argument)
_tls_key = _argument(key_argument)


def _secret_or_generate(value: str) -> str:
    return value if value == "generate" else _secret(value)


def _host_nqn(value: str) -> str:
    if not valid_nqn(value):
        raise argparse.ArgumentTypeError(f"not a host NQN: {value!r}")
    return value


def _snapshot_size(value: str) -> int:
    try:
        return parse_snapshot_size(value)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storagetm",
        description="Export this machine's disks over NVMe/TCP (target disk mode).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("devices", nargs="*", metavar="DEVICE|FILE",
                        help="block devices (path, by-id name or serial) or regular files to export")  # fmt: skip
    parser.add_argument("-a", "--all", action="count", default=0,
                        help="export every disk, now and hotplugged later; twice: also the root "
                        "disk, the boot medium and disks in use (mounted, swap)")  # fmt: skip
    parser.add_argument("--nqn", type=_nqn, metavar="PREFIX", help="NQN prefix (default: derived from this host)")
    parser.add_argument("--port", type=_port, default=None, help="TCP port for I/O (default 4420)")
    parser.add_argument("--read-only", dest="modes", action="append_const", const="ro",
                        help="export read-only: every write fails on the initiator")  # fmt: skip
    parser.add_argument("--snapshot", dest="modes", action="append_const", const="snapshot",
                        help="writes go to a RAM copy-on-write store; the disks are never written")  # fmt: skip
    parser.add_argument("--mode", dest="modes", action="append", metavar="[DISK=]MODE",
                        help="rw, ro or snapshot, for all disks or one disk (path, by-id name or serial)")  # fmt: skip
    parser.add_argument("--snapshot-size", type=_snapshot_size, default=None, metavar="SIZE",
                        help="copy-on-write RAM per disk in snapshot mode (default 1G, less if RAM "
                        "is short)")  # fmt: skip
    parser.add_argument("--auth", action="store_true",
                        help="require NVMe in-band authentication (DH-HMAC-CHAP); a secret is generated")  # fmt: skip
    parser.add_argument(
        "--dhchap-secret", type=_secret, metavar="DHHC-1:…", help="use this host secret (implies --auth)"
    )
    parser.add_argument(
        "--dhchap-ctrl-secret", nargs="?", const="generate", type=_secret_or_generate, metavar="DHHC-1:…",
        help="bidirectional: the target proves itself too (generated if no value); implies --auth",
    )  # fmt: skip
    parser.add_argument("--allow-host", action="append", type=_host_nqn, metavar="HOSTNQN",
                        help="host NQN allowed to connect (repeatable; implies --auth)")  # fmt: skip
    parser.add_argument(
        "--tls",
        action="store_true",
        help="require NVMe/TCP over TLS 1.3 with a pre-shared key (generated unless --tls-key)",
    )
    parser.add_argument("--tls-key", type=_tls_key, metavar="KEY", help="the PSK (NVMeTLSkey-1:01:…:); implies --tls")
    parser.add_argument(
        "--announce",
        action="store_true",
        help="announce the discovery service over mDNS (_nvme-disc._tcp, via systemd-resolved)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="once started, handle disk events at real-time priority (SCHED_RR 1), ahead of other services",
    )
    parser.add_argument("--list-devices", action="store_true", help="list block devices and whether they are exported")
    parser.add_argument("--kernel-cmdline", action="store_true", help="read storagetm.* options from /proc/cmdline")
    parser.add_argument("--console", action="store_true", help="draw the screen on the kernel's consoles, not stdout")
    parser.add_argument("--json", action="store_true", help="JSON output (with --list-devices)")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"storagetm {__version__}")
    return parser


def settings_from(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    settings = Settings(
        all_disks=args.all > 0,
        lift_guards=args.all > 1,
        # Files by their real path: named through a symlink or a relative path, they still match.
        devices=tuple(resolve_file(spec) or spec for spec in args.devices),
        nqn_base=args.nqn,
        port=args.port or Settings.port,
        snapshot_size=args.snapshot_size or Settings.snapshot_size,
        auth=bool(args.auth or args.dhchap_secret or args.dhchap_ctrl_secret or args.allow_host),
        dhchap_secret=args.dhchap_secret or "",
        dhchap_ctrl_secret=args.dhchap_ctrl_secret or "",
        allow_hosts=tuple(args.allow_host or ()),
        announce=args.announce,
        tls=bool(args.tls or args.tls_key),
        tls_key=args.tls_key or "",
        realtime=args.realtime,
    )
    for value in args.modes or []:
        try:
            settings = parse_modes(value, settings)
        except OptionError as exc:
            raise UsageError(f"invalid --mode: {exc}") from None
    problems: list[str] = []
    if args.kernel_cmdline:
        settings, problems = apply_kernel_cmdline(settings, read_kernel_cmdline())
    return settings, problems


def exported_now() -> set[str]:
    """What a running storagetm exports: its own dm-snapshot holds those disks exclusively."""
    try:
        current = state.running()
    except OSError:  # not root: the state file holds the secrets
        return set()
    return {export.disk.devnode for export in current.exports.values()} if current else set()


def list_devices(settings: Settings, as_json: bool) -> int:
    disks = BlockDevices().enumerate() + explicit_files(settings)
    base = settings.nqn_base or default_nqn_base(host_identity())
    selection = settings if (settings.all_disks or settings.devices) else Settings(all_disks=True)
    result = plan(disks, selection, system_facts(), base, exported=exported_now(), held=held_by_another)
    reasons = {d.devnode: result.why(d, r) for d, r in result.not_exported}
    exported = {e.disk.devnode: nqn for nqn, e in result.exports.items()}
    rows: list[dict[str, str | int | bool]] = []
    for disk in disks:
        rows.append({
            "device": disk.devnode, "type": disk.devtype, "size": disk.size, "model": disk.model,
            "serial": disk.serial, "export": disk.devnode in exported,
            "nqn": exported.get(disk.devnode, ""),
            "reason": reasons.get(disk.devnode, "" if disk.devnode in exported else "partition (whole disks only)"),
        })  # fmt: skip
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return ExitCode.OK
    for row in rows:
        verdict = "export" if row["export"] else f"skip: {row['reason']}"
        print(f"{row['device']:<22} {human_size(int(row['size'])):>10}  {str(row['model'])[:24]:<24}  {verdict}")
    return ExitCode.OK


def serve(argv: Sequence[str]) -> int:
    args = serve_parser().parse_args(argv)
    setup_logging(args.debug)
    if on_command_line(argv):
        log.warning("%s", ON_COMMAND_LINE)
    settings, problems = settings_from(args)
    for problem in problems:
        log.warning("%s", problem)
    if args.list_devices:
        return list_devices(settings, args.json)
    if not settings.all_disks and not settings.devices:
        raise UsageError("no disks selected", hint="give --all, or name the disks (DEVICE|FILE …)")
    if os.geteuid() != 0:
        raise UsageError("storagetm must run as root", hint="it configures the kernel's NVMe target")
    screen = Screen(active_consoles() if args.console else ())
    try:
        check_system_complete()
        return Daemon(settings, screen=screen, startup_problems=problems).run()
    except StorageTMError as exc:
        screen.fatal(exc.one_line())
        raise
    finally:
        screen.close()


def running_state(command: str) -> state.RunState:
    """The running daemon's state; one clear error if there is none or it is not ours to read."""
    try:
        current = state.running()
    except PermissionError:
        raise UsageError(f"storagetm {command} needs root: the state file holds the secrets",
                         hint=f"run it as root, e.g. sudo storagetm {command}") from None  # fmt: skip
    if current is None:
        raise NotRunningError("storagetm is not running", hint="start it with `storagetm --all`")
    return current


def status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm status", description="Show what storagetm exports.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show-secrets", action="store_true",
                        help="show the DH-HMAC-CHAP secrets and the TLS key (hidden by default)")  # fmt: skip
    args = parser.parse_args(argv)
    current = running_state("status")
    shown = current if args.show_secrets else current.without_secrets()
    if args.json:
        json.dump(shown.to_json(), sys.stdout, indent=1)
        print()
        return ExitCode.OK
    print(render(shown), end="")
    if shown is not current and (current.auth.enabled or current.tls.enabled):
        print(f"Secrets are shown as {HIDDEN}: `storagetm status --show-secrets` shows them.")
    return ExitCode.OK


def stop(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="storagetm stop", description="Stop storagetm and withdraw its exports.")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    current = running_state("stop")
    try:
        os.kill(current.pid, signal.SIGTERM)
    except PermissionError:
        raise UsageError("storagetm stop needs root: storagetm runs as root",
                         hint="run it as root, e.g. sudo storagetm stop") from None  # fmt: skip
    deadline = time.monotonic() + args.timeout
    while state.pid_alive(current.pid):
        if time.monotonic() > deadline:
            raise StorageTMError(f"storagetm (pid {current.pid}) did not stop within {args.timeout:.0f} s")
        time.sleep(0.1)
    print("storagetm stopped")
    return ExitCode.OK


def help_kernel_cmdline() -> str:
    return "\n".join(f"  storagetm.{opt.name}=  {opt.help}" for opt in KERNEL_OPTIONS)


def setup_logging(debug: bool) -> None:
    fmt = "%(message)s" if os.environ.get("JOURNAL_STREAM") else "storagetm: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(PrintableLogFilter())
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    commands = {"status": status, "stop": stop}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return serve(argv)
    except StorageTMError as exc:
        if debug:
            log.exception("failed")
        print(f"storagetm: {printable(exc.one_line())}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except Exception as exc:  # one line unless --debug; mkosi does the same at its top level
        if debug:
            raise
        print(f"storagetm: unexpected error: {printable(str(exc))} (run with --debug for details)", file=sys.stderr)
        return ExitCode.FAILURE
