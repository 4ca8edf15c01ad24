"""The end of a run: every exported disk flushed (its volatile write cache included), then
the machine powered off or rebooted when that was asked for, as upstream's SuccessAction.

How an end is asked for: SIGTERM or SIGINT stops storagetm and nothing more (systemd sends
SIGTERM when it shuts the machine down itself); SIGRTMIN+4 stops it and powers off,
SIGRTMIN+5 stops it and reboots (the signals PID 1 takes for the same, systemd(1)).
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Sequence

from storagetm.system.log import Logger

log = Logger(__name__)

SYSTEMCTL_TIMEOUT = 10.0  # seconds; --no-block only queues the job


class End(enum.Enum):
    """What follows storagetm's stop."""

    STOP = "stop"
    POWEROFF = "poweroff"
    REBOOT = "reboot"

    @property
    def doing(self) -> str:
        return {"stop": "", "poweroff": "powering off", "reboot": "rebooting"}[self.value]


SIGNALS: dict[int, End] = {
    signal.SIGTERM: End.STOP,
    signal.SIGINT: End.STOP,
    signal.SIGRTMIN + 4: End.POWEROFF,
    signal.SIGRTMIN + 5: End.REBOOT,
}
SIGNAL_OF = {End.STOP: signal.SIGTERM, End.POWEROFF: signal.SIGRTMIN + 4, End.REBOOT: signal.SIGRTMIN + 5}


def flush(path: str) -> None:
    """fsync() on the whole disk: the kernel writes what it still buffers for the device and
    sends it a cache flush (REQ_PREFLUSH), so what the initiators wrote survives the power
    going. Opened read-only: a close after a write-open makes udev probe the disk again."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_all(paths: Iterable[str], flusher: Callable[[str], None] | None = None) -> list[str]:
    """Flush each disk, logging each; the ones that could not be flushed, one line each."""
    failed = []
    for path in sorted(set(paths)):
        try:
            (flusher or flush)(path)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror or exc}")
            log.error("cannot flush %s: %s; what was written to it may not be on the disk yet",
                      path, exc.strerror or exc)  # fmt: skip
        else:
            log.info("flushed %s", path)
    return failed


def shutdown_under_way(run: Callable[[Sequence[str]], str] | None = None) -> End:
    """Whether systemd is powering off or rebooting now (a power button, Ctrl+Alt+Del):
    its queued job names the target. STOP when neither, or when systemd cannot say."""
    jobs = (run or _output)(["systemctl", "list-jobs", "--no-legend", "--no-pager"])
    units = {line.split()[1] for line in jobs.splitlines() if len(line.split()) > 1}
    if units & {"poweroff.target", "halt.target"}:
        return End.POWEROFF
    if units & {"reboot.target", "kexec.target"}:
        return End.REBOOT
    return End.STOP


def request(end: End, run: Callable[[Sequence[str]], str] | None = None) -> bool:
    """Queue systemd's power-off or reboot (storagetm has stopped by then); False if it could not."""
    if end is End.STOP:
        return True
    try:
        (run or _checked)(["systemctl", "--no-block", end.value])
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("cannot ask systemd to %s: %s; use the power button", end.value, exc)
        return False
    return True


def _output(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _checked(argv: Sequence[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, check=True).stdout
