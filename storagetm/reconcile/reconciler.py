"""The one `apply(desired)`: start, hotplug, a settings change at run time, crash
adoption and teardown (desired = nothing) all go through it.

Every make and every removal is recorded ahead in the journal. A failure undoes the
group it belongs to (one export: nothing is half exported) and skips what needs it;
removals go on past errors to the end (any OSError, not only ours), each logged once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from msgspec import Struct

from storagetm.errors import StorageTMError
from storagetm.reconcile.journal import MADE, Journal, Owned
from storagetm.reconcile.objects import Driver, Facts, Key, Obj
from storagetm.reconcile.plan import ADOPT, CREATE, REMOVE, UPDATE, Kinds, Op, plan
from storagetm.system.log import Logger

log = Logger(__name__)


class Failure(Struct, frozen=True):
    """An object that could not be made (or changed): its group is not exported."""

    key: Key
    group: str
    message: str
    hint: str = ""

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, StorageTMError):
        return exc.message, exc.hint or ""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), ""
    return str(exc), ""


class Reconciler:
    def __init__(self, drivers: Iterable[Driver], journal: Journal) -> None:
        self.drivers = {driver.kind: driver for driver in drivers}
        self.kinds = Kinds({k: d.rank for k, d in self.drivers.items()},
                           {k: d.mutable for k, d in self.drivers.items()})  # fmt: skip
        self.journal = journal
        self.held: set[Key] = set()  # made or adopted by this process
        self.last_ops: list[Op] = []

    @property
    def owned(self) -> dict[Key, Owned]:
        return self.journal.owned

    def recover(self) -> None:
        """Read what a previous instance recorded and keep only what the kernel still holds.
        What it was making before anything was learnt of it is removed here, found by name
        (its facts were never recorded); what it was making or removing with facts stays
        owned, half made, and the next apply removes it (and makes it anew if wanted)."""
        self.journal.load()
        gone: list[Key] = []
        for key, owned in list(self.owned.items()):
            driver = self.drivers.get(owned.kind)
            if driver is None:
                log.warning("the ownership record names a %s, which this storagetm does not know; leaving it",
                            owned.kind)  # fmt: skip
                gone.append(key)
                continue
            obj = owned.as_obj()
            try:
                if owned.state == MADE or owned.facts:
                    if not driver.present(obj, owned.facts):
                        gone.append(key)
                else:
                    driver.discard_partial(obj)  # making, nothing learnt yet: find it by name
                    gone.append(key)
            except (OSError, StorageTMError) as exc:
                log.warning("cannot look at %s %s left by the previous storagetm: %s, ignoring", owned.kind,
                            owned.name, _describe(exc)[0])  # fmt: skip
        self.journal.forget(gone)
        if self.owned:
            log.info("the previous storagetm left %d kernel objects; keeping what is still wanted", len(self.owned))
        if self.owned or self.journal.path.exists():
            self.journal.compact()

    def apply(self, desired: Sequence[Obj]) -> list[Failure]:
        wanted = {obj.key: obj for obj in desired}
        ops = plan(desired, self.owned, self.kinds, self.held)
        self.last_ops = ops
        failures: list[Failure] = []
        failed_groups: set[str] = set()
        failed_keys: set[Key] = set()
        for op in ops:
            if op.action == REMOVE:
                if not self._remove(op.key) and op.key in wanted:
                    failed_keys.add(op.key)  # still there: it cannot be made anew
                    group = wanted[op.key].group
                    failures.append(Failure(op.key, group, f"{op.key[0]} {op.key[1]} cannot be made anew: the old one "
                                                           "could not be removed (see the log)"))  # fmt: skip
                    if group:
                        failed_groups.add(group)
                continue
            obj = wanted[op.key]
            if obj.group in failed_groups or op.key in failed_keys:
                failed_keys.add(op.key)
                continue
            blocked = next((need for need in obj.needs if need in failed_keys), None)
            if blocked is not None:
                failed_keys.add(op.key)
                if obj.group:
                    failed_groups.add(obj.group)
                    failures.append(Failure(op.key, obj.group, f"{obj.group}: needs {blocked[0]} {blocked[1]}, "
                                                               "which could not be made"))  # fmt: skip
                continue
            try:
                self._do(op, obj)
            except (OSError, StorageTMError) as exc:
                message, hint = _describe(exc)
                failed_keys.add(op.key)
                failures.append(Failure(op.key, obj.group, f"{obj.group}: {message}" if obj.group else message, hint))
                if obj.group:
                    failed_groups.add(obj.group)
        adopted = sum(op.action == ADOPT for op in ops)
        if adopted:
            log.info("adopted %d kernel object%s a previous storagetm made", adopted, "s" if adopted != 1 else "")
        for group in sorted(failed_groups):
            self.remove_group(group)
        self.journal.maybe_compact()
        return failures

    def _do(self, op: Op, obj: Obj) -> None:
        driver = self.drivers[obj.kind]
        if op.action == CREATE:
            if driver.foreign(obj):
                raise StorageTMError(f"{obj.kind} {obj.name} is already in the kernel, made by another program",
                                     hint="remove it, or export under a different name")  # fmt: skip
            self.journal.making(obj)
            try:
                facts = driver.create(obj, self._facts_of)
            except BaseException:
                self._forget_failed_make(obj)
                raise
            self.journal.made(obj, facts)
            self.held.add(obj.key)
            log.debug("made %s %s", obj.kind, obj.name)
        elif op.action == UPDATE:
            facts = driver.update(obj, self.owned[obj.key].facts, op.changed)
            self.journal.made(obj, facts)
        elif op.action == ADOPT:
            driver.adopt(obj, self.owned[obj.key].facts)
            self.held.add(obj.key)

    def _forget_failed_make(self, obj: Obj) -> None:
        """A driver leaves nothing behind when it raises; if it could not, say so and try once more."""
        try:
            self.drivers[obj.kind].discard_partial(obj)
        except (OSError, StorageTMError) as exc:
            log.warning("cannot remove what was made of %s %s: %s, ignoring", obj.kind, obj.name, _describe(exc)[0])
        try:
            self.journal.removed(obj.key)
        except OSError as exc:
            log.warning("cannot record that %s %s was not made: %s", obj.kind, obj.name, _describe(exc)[0])

    def _facts_of(self, key: Key) -> Facts:
        owned = self.owned.get(key)
        return owned.facts if owned is not None else {}

    def _remove(self, key: Key) -> bool:
        """Remove one owned object; False if it is still there. Best-effort: errors are logged."""
        owned = self.owned[key]
        driver = self.drivers[owned.kind]
        try:
            self.journal.removing(key)
        except OSError as exc:  # a full /run must not keep an object alive; the next start looks
            log.warning("cannot record the removal of %s %s: %s", owned.kind, owned.name, _describe(exc)[0])
        try:
            driver.remove(owned.as_obj(), owned.facts)
        except (OSError, StorageTMError) as exc:
            log.warning("%s, ignoring", _describe(exc)[0])
            return False
        self.held.discard(key)
        try:
            self.journal.removed(key)
        except OSError:
            self.journal.forget([key])
        log.debug("removed %s %s", owned.kind, owned.name)
        return True

    def remove_group(self, group: str) -> None:
        """Withdraw what is owned of one export, dependents first (after a failure)."""
        self.apply_subset([o.as_obj() for o in self.owned.values() if o.group != group], only_group=group)

    def apply_subset(self, keep: Sequence[Obj], only_group: str) -> None:
        ops = plan(keep, {k: o for k, o in self.owned.items() if o.group == only_group}, self.kinds, self.held)
        for op in ops:
            if op.action == REMOVE:
                self._remove(op.key)

    def teardown(self) -> None:
        """Desired = nothing: every owned object goes, best-effort to the end."""
        self.apply(())
        self.journal.discard()
