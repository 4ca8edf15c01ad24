"""Entry of the one-file helper (storagetm.pyz): the other machine's commands, reached
without importing the target's side. storagetm.cli imports the daemon's state, options,
console and disk modules first; in the helper that import was most of a short copy's time
(measured under emulation), and the other machine needs none of it.

Errors end as storagetm.cli.main ends them: one line on stderr and the error's exit code.
Every other command (--help, status, the target itself) goes to storagetm.cli.main."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from storagetm.errors import ExitCode, StorageTMError

COMMANDS = ("targets", "connect", "copy", "disconnect", "decode")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
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
