"""Reading a disk ahead in a thread, block after block, into page-aligned buffers (O_DIRECT
wants them), so that the next block is on its way from the target while this one is used.

O_DIRECT reads (the check) get no readahead from the kernel: one read at a time left the
target idle while this machine compared a block, and this machine idle while the target sent
the next. Buffered reads (the copy) get the kernel's readahead, a window of a few hundred KiB
that stops growing while the process writes the block it has. The thread waits in the read
with the GIL released; there are `depth` buffers, so it is at most `depth - 1` blocks ahead
of the one handed out.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable, Iterator

# (offset, buffer, bytes read), or what the read at that offset raised
Block = tuple[int, memoryview, int | Exception]


class ReadAhead:
    def __init__(self, read: Callable[[memoryview, int], int], size: int, block: int, start: int = 0,
                 depth: int = 2) -> None:  # fmt: skip
        self.read, self.size, self.block, self.start = read, size, block, start
        self.free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self.ready: queue.SimpleQueue[Block] = queue.SimpleQueue()
        for _ in range(depth):
            self.free.put(memoryview(mmap.mmap(-1, block)))
        self.thread = threading.Thread(target=self._run, name="storagetm-readahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        offset = self.start
        while offset < self.size:
            view = self.free.get()
            if view is None:
                return
            want = min(self.block, self.size - offset)
            try:
                got: int | Exception = self.read(view[:want], offset)
            except Exception as exc:  # whatever it is, the consumer raises it: it must not wait for ever
                got = exc
            self.ready.put((offset, view, got))
            if isinstance(got, Exception):
                return
            offset += want

    def blocks(self) -> Iterator[tuple[int, memoryview, int]]:
        """(offset, its bytes, how many were read) in order; raises what a read raised, at its
        offset. Each block's buffer is reused once the next block is asked for."""
        offset = self.start
        while offset < self.size:
            at, view, got = self.ready.get()
            if isinstance(got, Exception):
                raise got
            yield at, view[:got], got
            self.free.put(view)
            offset += min(self.block, self.size - offset)

    def close(self) -> None:
        """Stops the thread (after the read it is in) and waits for it: the caller closes the
        file it reads only then."""
        self.free.put(None)
        self.thread.join()
