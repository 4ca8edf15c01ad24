"""One progress line on stderr: redrawn in place on a terminal, a line per tenth otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from storagetm.text import human_size


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, start: int = 0, stream: TextIO | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.now = now
        self.began = now()
        self.drawn_at = float("-inf")
        self.tenth = -1

    def line(self, done: int) -> str:
        elapsed = max(self.now() - self.began, 1e-6)
        rate = (done - self.start) / elapsed
        percent = 100 * done / self.total if self.total else 100.0
        eta = clock((self.total - done) / rate) if rate > 0 else "-:--:--"
        amounts = f"{human_size(done)} of {human_size(self.total)}, {human_size(rate)}/s"
        return f"{self.label}: {percent:3.0f}% {amounts}, ETA {eta}"

    def update(self, done: int, *, force: bool = False) -> None:
        if self.terminal:
            if force or self.now() - self.drawn_at >= 0.25:
                self.drawn_at = self.now()
                self.stream.write(f"\r{self.line(done)}\033[K")
                self.stream.flush()
            return
        tenth = 10 * done // self.total if self.total else 10
        if tenth != self.tenth or force:
            self.tenth = tenth
            print(self.line(done), file=self.stream, flush=True)

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()
