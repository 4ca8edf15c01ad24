"""The ownership record, written ahead: before storagetm makes a kernel object the record
says "making X", after it "made X" (with what making it found out); removing likewise.
A restart replays it and so knows every object a killed instance made or was making, and
never touches one it did not make.

One JSON object a line, appended with one write(2) each: a SIGKILL cannot tear a line
(the page cache outlives the process; /run is RAM, so a power cut takes the objects too).
The file is rewritten (atomically) when it has grown, holding only what is owned.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct, field
from msgspec.structs import replace

from storagetm.reconcile.objects import Facts, Key, Obj
from storagetm.statefile import FILE_MODE, private_directory, write_atomic
from storagetm.system.log import Logger

log = Logger(__name__)

JOURNAL_FILE = Path("/run/storagetm/owned.jsonl")
COMPACT_AFTER = 2000  # lines; a hotplug writes about a dozen

MAKING, MADE, REMOVING = "making", "made", "removing"


class Owned(Struct, frozen=True):
    """One object the record says storagetm made (or was making or removing)."""

    kind: str
    name: str
    attrs: Mapping[str, str] = field(default_factory=dict)  # as recorded: secrets by digest
    needs: tuple[Key, ...] = ()
    group: str = ""
    facts: Facts = field(default_factory=dict)
    state: str = MADE

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    def as_obj(self) -> Obj:
        """The object as far as the record knows it (secret attributes by digest)."""
        return Obj(self.kind, self.name, tuple(sorted(self.attrs.items())), self.needs, self.group)

    @classmethod
    def of(cls, obj: Obj, state: str, facts: Facts | None = None) -> Owned:
        return cls(obj.kind, obj.name, obj.recorded_attrs, obj.needs, obj.group, dict(facts or {}), state)


def _line(op: str, owned: Owned) -> dict[str, Any]:
    return {"op": op, "kind": owned.kind, "name": owned.name, "attrs": dict(owned.attrs),
            "needs": [list(k) for k in owned.needs], "group": owned.group, "facts": dict(owned.facts)}  # fmt: skip


FaultHook = Callable[[int, bool], None]  # (record number, before it is written)


class Journal:
    """Appends records; `owned` is what they add up to."""

    def __init__(self, path: Path | None = None, fault: FaultHook | None = None) -> None:
        self.path = path or JOURNAL_FILE
        self.fault = fault
        self.owned: dict[Key, Owned] = {}
        self.lines = 0
        self.records = 0  # written by this process: the fault hook counts them
        self._fd: int | None = None
        self._torn = False

    # ---- reading -------------------------------------------------------------

    def load(self) -> dict[Key, Owned]:
        """Replay the record a previous instance left (a torn or unknown line is skipped)."""
        self.owned = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return self.owned
        for number, raw in enumerate(text.splitlines(), 1):
            if not raw:
                continue
            try:
                self._replay(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d is not a record, skipping it", self.path, number)
        self.lines = len(text.splitlines())
        return self.owned

    def _replay(self, line: dict[str, Any]) -> None:
        key = (str(line["kind"]), str(line["name"]))
        op = line["op"]
        if op == "removed":
            self.owned.pop(key, None)
            return
        if op not in (MAKING, MADE, REMOVING):
            raise ValueError(op)
        self.owned[key] = Owned(key[0], key[1], {str(k): str(v) for k, v in line["attrs"].items()},
                                tuple((str(k), str(n)) for k, n in line["needs"]), str(line["group"]),
                                {str(k): str(v) for k, v in line["facts"].items()}, op)  # fmt: skip

    # ---- writing -------------------------------------------------------------

    def making(self, obj: Obj) -> None:
        self._append(MAKING, Owned.of(obj, MAKING))

    def made(self, obj: Obj, facts: Facts) -> None:
        self._append(MADE, Owned.of(obj, MADE, facts))

    def removing(self, key: Key) -> None:
        self._append(REMOVING, replace(self.owned[key], state=REMOVING))

    def removed(self, key: Key) -> None:
        if key in self.owned:
            self._append("removed", self.owned[key])

    def _append(self, op: str, owned: Owned) -> None:
        self.records += 1
        if self.fault is not None:
            self.fault(self.records, True)
        data = (json.dumps(_line(op, owned), separators=(",", ":")) + "\n").encode()
        if self._torn:  # the last write was cut short: end that line first, or this one is lost with it
            data = b"\n" + data
        if self._fd is None:
            private_directory(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                               FILE_MODE)  # fmt: skip
            os.fchmod(self._fd, FILE_MODE)  # one an older instance left keeps no other mode
        written = os.write(self._fd, data)
        self._torn = written != len(data)
        if self._torn:  # a full /run: the rest of the line is lost, and the object is not made
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        self.lines += 1
        if op == "removed":
            self.owned.pop(owned.key, None)
        else:
            self.owned[owned.key] = owned
        if self.fault is not None:
            self.fault(self.records, False)

    def forget(self, keys: Iterable[Key]) -> None:
        """Drop objects the kernel no longer holds (the record said making, or someone
        removed them): written at the next compaction."""
        for key in keys:
            self.owned.pop(key, None)

    def compact(self) -> None:
        """Rewrite the file with only what is owned (temp file, rename)."""
        self.close()
        body = "".join(json.dumps(_line(o.state, o), separators=(",", ":")) + "\n" for o in self.owned.values())
        write_atomic(self.path, body.encode(), sync=False)
        self.lines = len(self.owned)

    def maybe_compact(self) -> None:
        if self.lines > COMPACT_AFTER:
            with contextlib.suppress(OSError):
                self.compact()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Nothing is owned any more: the file goes."""
        self.close()
        if not self.owned:
            self.path.unlink(missing_ok=True)


def fault_from_environment(value: str | None) -> FaultHook | None:
    """STORAGETM_TEST_KILL_AT=N kills the process with SIGKILL right after the N-th record
    is written, =N- right before it is (its object made, the record not yet saying so).
    Only the VM suite's fault-injection test sets it."""
    if not value:
        return None
    before = value.endswith("-")
    try:
        point = int(value.rstrip("-"))
    except ValueError:
        log.warning("ignoring STORAGETM_TEST_KILL_AT=%r: not N or N-", value)
        return None

    def hook(record: int, is_before: bool) -> None:
        if record == point and is_before == before:
            log.warning("STORAGETM_TEST_KILL_AT=%s: killing myself", value)
            os.kill(os.getpid(), 9)

    return hook
