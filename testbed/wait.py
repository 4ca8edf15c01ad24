"""The one poll-until-deadline loop of the harness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from testbed import VMError

T = TypeVar("T")


def until(condition: Callable[[], T | None], timeout: float, failure: str | Callable[[], str], pause: float = 1.0) -> T:
    """Call `condition` every `pause` seconds until it returns something true, and return that.
    After `timeout` seconds raise VMError with `failure` (a callable is asked only then, so the
    message can show the last thing seen). `condition` is always called at least once."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise VMError(failure() if callable(failure) else failure)
        time.sleep(pause)
