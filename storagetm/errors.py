"""Error types. Each carries a message saying what is wrong and a hint saying what to do."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented exit codes of the storagetm command (see README)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    KERNEL = 3  # nvmet/configfs missing or unusable
    NOT_RUNNING = 4  # status/stop: no daemon is running
    # 5 is not used: it was documented as "nothing to export" and never returned. With no disk
    # to export storagetm waits: disks, media and named devices may still appear.
    INSUFFICIENT_MEMORY = 6  # the system did not fit in RAM


class StorageTMError(Exception):
    """Base class: `message` says what is wrong, `hint` what to do about it."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(StorageTMError):
    exit_code = ExitCode.USAGE


class KernelError(StorageTMError):
    """The kernel lacks something we need (configfs, nvmet, nvmet_tcp)."""

    exit_code = ExitCode.KERNEL


class ConfigfsError(StorageTMError):
    """A configfs operation failed."""


class NotRunningError(StorageTMError):
    exit_code = ExitCode.NOT_RUNNING
