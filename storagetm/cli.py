"""The storagetm command: a drop-in for systemd-storagetm's options, plus status/stop.

Each command imports what it runs, and only then: `storagetm FILE…` on a running image hands
its files to the daemon over the control socket (control.py) before anything else is loaded."""

from __future__ import annotations

import os
import sys

from storagetm import __version__, control

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping, Sequence

    from storagetm import state
    from storagetm.config.settings import Settings

EPILOG = """\
subcommands:
  storagetm status [--json] [--show-secrets]   show what a running storagetm exports
  storagetm stop [--poweroff|--reboot]         stop it: exports withdrawn, disks flushed
                                               (then power off or reboot)

{initiator_usage}
secrets: --dhchap-secret=@FILE, --tls-key=@FILE or the systemd credentials storagetm.*
         keep them off the command line, which every user can read

exit codes: 0 ok, 1 failure, 2 usage error (or not root), 3 kernel lacks nvmet/configfs,
            4 no storagetm running, 6 the system did not fit in RAM
"""


def serve_parser() -> argparse.ArgumentParser:
    import argparse

    from storagetm.config import options
    from storagetm.initiator.main import INITIATOR_USAGE

    parser = argparse.ArgumentParser(
        prog="storagetm",
        description="Export this machine's disks over NVMe/TCP (target disk mode).",
        epilog=EPILOG.format(initiator_usage=INITIATOR_USAGE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_arguments(parser)
    parser.add_argument("--list-devices", action="store_true", help="list block devices and whether they are exported")
    parser.add_argument("--kernel-cmdline", action="store_true", help="read storagetm.* options from /proc/cmdline")
    parser.add_argument("--help-kernel-cmdline", action="store_true", help="list the storagetm.* boot options")
    parser.add_argument("--console", action="store_true", help="draw the screen on the kernel's consoles, not stdout")
    parser.add_argument("--json", action="store_true", help="JSON output (with --list-devices)")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"storagetm {__version__}")
    return parser


def settings_from(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    from storagetm.config import options

    settings = options.settings_of(args)
    problems: list[str] = []
    if args.kernel_cmdline:
        settings, problems = options.apply_kernel_cmdline(settings, options.read_kernel_cmdline())
    return settings, problems


def exported_now() -> set[str]:
    """What a running storagetm exports: its own dm-snapshot holds those disks exclusively."""
    from storagetm import state

    try:
        current = state.running()
    except OSError:  # not root: the state file holds the secrets
        return set()
    return {export.disk.devnode for export in current.exports.values()} if current else set()


def list_devices(settings: Settings, as_json: bool) -> int:
    import json

    from storagetm.config.settings import Settings
    from storagetm.disks.identity import default_nqn_base, host_identity
    from storagetm.disks.policy import held_by_another, system_facts, unlisted_reason
    from storagetm.disks.udev import BlockDevices
    from storagetm.errors import ExitCode
    from storagetm.selection import explicit_files, plan
    from storagetm.text import human_size

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
            "reason": reasons.get(disk.devnode, "" if disk.devnode in exported else unlisted_reason(disk)),
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
    from msgspec.structs import replace

    from storagetm.config import options
    from storagetm.console import font
    from storagetm.console.screen import Screen, active_consoles
    from storagetm.disks.identity import nvme_overrides
    from storagetm.errors import ExitCode, StorageTMError, UsageError
    from storagetm.security.keys import ON_COMMAND_LINE, on_command_line
    from storagetm.system import log as logs
    from storagetm.system.memory import check_system_complete

    log = logs.Logger("storagetm")
    # Intermixed, as getopt permutes: `storagetm FILE --nqn=quux` and `storagetm a --port=N b`.
    args = serve_parser().parse_intermixed_args(argv)
    logs.configure(args.debug)
    if args.help_kernel_cmdline:
        print(options.kernel_help(), end="")
        return ExitCode.OK
    if on_command_line(argv):
        log.warning("%s", ON_COMMAND_LINE)
    settings, problems = settings_from(args)
    for problem in problems:
        log.warning("%s", problem)
    overrides, warnings = nvme_overrides(os.environ)
    for warning in warnings:
        log.warning("%s", warning)
    settings = replace(settings, nvme=overrides)
    if (overrides.serial or overrides.uuid) and settings.identity_overrides() != overrides:
        log.warning("$SYSTEMD_NVME_SERIAL and $SYSTEMD_NVME_UUID apply only to a single named disk; "
                    "with several each disk keeps its own, ignoring")  # fmt: skip
    if args.list_devices:
        return list_devices(settings, args.json)
    if not settings.all_disks and not settings.devices:
        raise UsageError("no disks selected", hint="give --all, or name the disks (DEVICE|FILE …)")
    if os.geteuid() != 0:
        raise UsageError("storagetm must run as root", hint="it configures the kernel's NVMe target")
    screen = Screen(active_consoles() if args.console else ())
    for terminal in font.virtual_terminals(screen.consoles):
        font.enlarge(terminal)  # before the first draw: the screen is laid out for its size
    try:
        check_system_complete()
        from storagetm.daemon import Daemon  # the engine only where it runs: status and stop need none of it

        return Daemon(settings, screen=screen, startup_problems=problems).run()
    except StorageTMError as exc:
        screen.fatal(exc.one_line())
        raise
    finally:
        screen.close()


def running_state(command: str) -> state.RunState:
    """The running daemon's state; one clear error if there is none or it is not ours to read."""
    from storagetm import state
    from storagetm.errors import NotRunningError, UsageError

    try:
        current = state.running()
    except PermissionError:
        raise UsageError(f"storagetm {command} needs root: the state file holds the secrets",
                         hint=f"run it as root, e.g. sudo storagetm {command}") from None  # fmt: skip
    if current is None:
        raise NotRunningError("storagetm is not running", hint="start it with `storagetm --all`")
    return current


def status(argv: Sequence[str]) -> int:
    import argparse
    import json

    from storagetm import connection
    from storagetm.console.screen import render
    from storagetm.errors import ExitCode
    from storagetm.security.keys import HIDDEN

    parser = argparse.ArgumentParser(prog="storagetm status", description="Show what storagetm exports.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show-secrets", action="store_true",
                        help="show the DH-HMAC-CHAP secrets and the TLS key (hidden by default)")  # fmt: skip
    args = parser.parse_args(argv)
    current = running_state("status")
    shown = current if args.show_secrets else current.without_secrets()
    if args.json:
        data = shown.to_json()
        code = connection.code_text(current)
        secret = current.auth.enabled or current.tls.enabled
        data["connection_code"] = HIDDEN if code and secret and not args.show_secrets else code
        json.dump(data, sys.stdout, indent=1)
        print()
        return ExitCode.OK
    print(render(shown), end="")
    if shown is not current and (current.auth.enabled or current.tls.enabled):
        print(f"Secrets are shown as {HIDDEN}: `storagetm status --show-secrets` shows them.")
    return ExitCode.OK


def stop(argv: Sequence[str]) -> int:
    import argparse
    import time

    from storagetm import state
    from storagetm.errors import ExitCode, StorageTMError, UsageError
    from storagetm.system import power

    parser = argparse.ArgumentParser(prog="storagetm stop", description="Stop storagetm and withdraw its exports.")
    parser.add_argument("--timeout", type=float, default=30.0)
    then = parser.add_mutually_exclusive_group()
    then.add_argument("--poweroff", dest="end", action="store_const", const=power.End.POWEROFF,
                      default=power.End.STOP, help="then power the machine off")  # fmt: skip
    then.add_argument("--reboot", dest="end", action="store_const", const=power.End.REBOOT,
                      help="then reboot the machine")  # fmt: skip
    args = parser.parse_args(argv)
    current = running_state("stop")
    try:
        os.kill(current.pid, power.SIGNAL_OF[args.end])
    except PermissionError:
        raise UsageError("storagetm stop needs root: storagetm runs as root",
                         hint="run it as root, e.g. sudo storagetm stop") from None  # fmt: skip
    deadline = time.monotonic() + args.timeout
    while state.pid_alive(current.pid):
        if time.monotonic() > deadline:
            raise StorageTMError(f"storagetm (pid {current.pid}) did not stop within {args.timeout:.0f} s")
        time.sleep(0.1)
    print("storagetm stopped" + (f"; the machine is {args.end.doing}" if args.end.doing else ""))
    return ExitCode.OK


INITIATOR_COMMANDS = ("targets", "connect", "copy", "disconnect", "decode")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"status": status, "stop": stop}
    specs = control.handover_specs(argv, (*commands, *INITIATOR_COMMANDS))
    if specs is not None and (handed := control.hand_over(specs)) is not None:
        return handed
    return run_command(argv, commands)


def run_command(argv: list[str], commands: Mapping[str, Callable[[Sequence[str]], int]]) -> int:
    """The command run in this process (today's path: with `storagetm FILE…`, a whole engine)."""
    from storagetm.errors import ExitCode, StorageTMError
    from storagetm.text import printable

    debug = "--debug" in argv
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        if argv and argv[0] in INITIATOR_COMMANDS:
            from storagetm.initiator.commands import run  # the other machine's side: stdlib only

            return run(argv)
        return serve(argv)
    except StorageTMError as exc:
        if debug:
            from storagetm.system.log import Logger, configure

            configure(debug=True)
            Logger("storagetm").exception("failed")
        print(f"storagetm: {printable(exc.one_line())}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except Exception as exc:  # one line unless --debug; mkosi does the same at its top level
        if debug:
            raise
        print(f"storagetm: unexpected error: {printable(str(exc))} (run with --debug for details)", file=sys.stderr)
        return ExitCode.FAILURE
