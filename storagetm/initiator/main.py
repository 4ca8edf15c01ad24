"""Entry of the one-file helper (storagetm.pyz): the other machine's commands, reached
without importing the target's side. storagetm.cli imports the daemon's state, options,
console and disk modules first; in the helper that import was most of a short copy's time
(measured under emulation), and the other machine needs none of it.

Errors end as storagetm.cli.main ends them: one line on stderr and the error's exit code.
--help lists the helper's commands. Every other command (status, the target itself) goes to
storagetm.cli.main where the target's side is installed, and is one clear line where it is not."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from storagetm.errors import ExitCode, StorageTMError

COMMANDS = ("targets", "connect", "copy", "disconnect", "decode")
INITIATOR_USAGE = """\
on the other machine (the initiator; root, nvme-cli):
  storagetm targets [CODE]                     find targets on the local links (mDNS)
  storagetm connect [TARGET|CODE] [--disk D]   connect every disk (or D), print the devices
  storagetm copy DISK DEST | --all DIR         copy with progress, resumable, verified
  storagetm disconnect [TARGET]                disconnect what connect connected
  storagetm decode CODE                        show what a connection code holds
  (CODE as - reads it from stdin, @FILE from FILE: off the command line, which every user can read)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: storagetm COMMAND [ARGS]  (COMMAND --help says more)\n\n{INITIATOR_USAGE}", end="")
        return ExitCode.OK
    if argv[0] not in COMMANDS:
        from importlib.util import find_spec

        if find_spec("msgspec") is None:  # the target's side needs it; the other machine need not have it
            print(f"storagetm: {argv[0]!r} is not a command of this helper (it runs {', '.join(COMMANDS)}); "
                  "the target's commands run on the target", file=sys.stderr)  # fmt: skip
            return ExitCode.USAGE
        from storagetm.cli import main as target_main

        return target_main(argv)
    from storagetm.text import printable

    try:
        from storagetm.initiator.commands import run

        return run(argv)
    except StorageTMError as exc:
        print(f"storagetm: {printable(exc.one_line())}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except Exception as exc:
        if "--debug" in argv:
            raise
        print(f"storagetm: unexpected error: {printable(str(exc))} (run with --debug for details)", file=sys.stderr)
        return ExitCode.FAILURE
