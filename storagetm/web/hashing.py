"""sha256 of an exported disk, computed on the target on request: one computation per disk at
a time, in a thread of its own, kept while the disk is the same. "The same": the same device,
size and mode, and no byte written to it since (the write counter of the dashboard, when the
device has one). The page and the screen show how far a computation has got."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping

from msgspec import Struct

from storagetm.model import HashProgress
from storagetm.system.log import Logger
from storagetm.web.images import open_read_only

log = Logger(__name__)

CHUNK = 1 << 20


class HashKey(Struct, frozen=True):
    path: str
    size: int
    mode: str
    generation: int  # bytes written to the device since export; -1 where nothing counts them


class HashJob(Struct):
    key: HashKey
    done: int = 0  # bytes hashed so far
    digest: str = ""
    error: str = ""
    finished: bool = False
    cancelled: bool = False  # its device is going away

    @property
    def fraction(self) -> float:
        return 1.0 if self.finished else self.done / self.key.size if self.key.size else 0.0

    def progress(self) -> HashProgress:
        finished = self.finished  # read first: the thread sets the digest or error, then this
        return HashProgress(self.done, self.key.size, self.digest if finished else "", self.error if finished else "")


class Hashes:
    """The jobs, by disk name. Threads only read the device, and stop when asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, HashJob] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()

    def request(self, name: str, key: HashKey) -> HashJob:
        """The job for `key`: done, running, or started now. A running job for an older key
        is left to finish first (one at a time per disk); the next request starts anew."""
        with self.lock:
            job = self.jobs.get(name)
            if job is not None and (job.key == key or not job.finished):
                return job
            job = self.jobs[name] = HashJob(key)
            thread = threading.Thread(target=self._run, args=(job,), name=f"sha256 {name}", daemon=True)
            self.threads[name] = thread
        thread.start()
        return job

    def current(self, name: str, key: HashKey) -> HashJob | None:
        """The job for `key` if there is one (done or running); nothing is started."""
        with self.lock:
            job = self.jobs.get(name)
        return job if job is not None and job.key == key else None

    def shown(self, now: Mapping[str, HashKey]) -> dict[str, HashProgress]:
        """Disk name -> its computation as the screen and `storagetm status` show it, for the
        disks in `now` (each with the key it has now): every one running, and every one done
        whose disk is still the same (a digest of what the disk was is no use to compare)."""
        with self.lock:
            jobs = {name: job for name, job in self.jobs.items() if name in now}
        return {name: job.progress() for name, job in jobs.items() if not job.finished or job.key == now[name]}

    def _run(self, job: HashJob) -> None:
        digest = hashlib.sha256()
        try:
            fd, _ = open_read_only(job.key.path)
        except OSError as exc:
            job.error, job.finished = f"cannot open {job.key.path}: {exc.strerror}", True
            return
        try:
            while job.done < job.key.size and not self.stopping.is_set() and not job.cancelled:
                block = os.pread(fd, min(CHUNK, job.key.size - job.done), job.done)
                if not block:
                    break
                digest.update(block)
                job.done += len(block)
        except OSError as exc:
            job.error = f"read error at byte {job.done}: {exc.strerror}"
        finally:
            os.close(fd)
        if not job.error and job.done != job.key.size:
            job.error = "stopped" if self.stopping.is_set() or job.cancelled else f"the device ended at byte {job.done}"
        if job.error:
            log.warning("sha256 of %s: %s", job.key.path, job.error)
        else:
            job.digest = digest.hexdigest()
        job.finished = True

    def release(self, paths: set[str], timeout: float = 5.0) -> None:
        """Stop the computations reading these devices, and wait until they closed them."""
        with self.lock:
            going = [name for name, job in self.jobs.items() if job.key.path in paths and not job.finished]
            for name in going:
                self.jobs[name].cancelled = True
            threads = [self.threads[name] for name in going if name in self.threads]
        for thread in threads:
            thread.join(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        for thread in list(self.threads.values()):
            thread.join(timeout)
