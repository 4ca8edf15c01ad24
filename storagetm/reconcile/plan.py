"""The pure half of reconciling: given the desired objects and the owned ones, the exact
operations, in order. No I/O here; the table-driven unit tests pin it down.

- An owned object that is not desired, was only half made or half removed, or differs from
  the desired one in an attribute its driver cannot change in place, or in what it needs,
  is removed, and before it everything owned that needs it (which is then made anew).
- Removals come first, dependents before what they need; then makes and in-place updates,
  what is needed before what needs it. Free to go in any order, objects go by their kind's
  rank, then group, then name: the same inputs always give the same operations.
- Owned objects that stay are adopted once by the process that did not make them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from msgspec import Struct

from storagetm.reconcile.journal import MADE, Owned
from storagetm.reconcile.objects import Key, Obj

REMOVE, CREATE, UPDATE, ADOPT = "remove", "create", "update", "adopt"


class Op(Struct, frozen=True):
    action: str
    key: Key
    changed: frozenset[str] = frozenset()  # UPDATE: the attributes to change

    def __str__(self) -> str:
        extra = f" ({', '.join(sorted(self.changed))})" if self.changed else ""
        return f"{self.action} {self.key[0]} {self.key[1]}{extra}"


class Kinds(Struct, frozen=True):
    """What the plan needs to know of each kind's driver."""

    rank: Mapping[str, int]
    mutable: Mapping[str, frozenset[str]]


def changed_attrs(want: Obj, have: Owned) -> frozenset[str]:
    recorded = want.recorded_attrs
    names = set(recorded) | set(have.attrs)
    return frozenset(n for n in names if recorded.get(n) != have.attrs.get(n))


def plan(desired: Sequence[Obj], owned: Mapping[Key, Owned], kinds: Kinds, held: Collection[Key] = ()) -> list[Op]:
    wanted = {obj.key: obj for obj in desired}
    if len(wanted) != len(desired):
        raise ValueError("two desired objects with one key")
    for obj in desired:
        missing = [need for need in obj.needs if need not in wanted]
        if missing:
            raise ValueError(f"{obj.kind} {obj.name} needs {missing[0]}, which is not desired")

    def order(key: Key) -> tuple[int, str, str, str]:
        obj = wanted.get(key) or owned[key].as_obj()
        return (kinds.rank.get(obj.kind, 50), obj.group, obj.kind, obj.name)

    doomed: set[Key] = set()
    updates: dict[Key, frozenset[str]] = {}
    for key, have in owned.items():
        want = wanted.get(key)
        if want is None or have.state != MADE or want.needs != have.needs:
            doomed.add(key)
            continue
        changed = changed_attrs(want, have)
        if changed - kinds.mutable.get(key[0], frozenset()):
            doomed.add(key)
        elif changed:
            updates[key] = changed
    # What needs a doomed object goes with it (it would point at nothing, or keep it busy).
    dependents: dict[Key, set[Key]] = {}
    for key, have in owned.items():
        for need in have.needs:
            dependents.setdefault(need, set()).add(key)
    stack = list(doomed)
    while stack:
        for dependent in dependents.get(stack.pop(), ()):
            if dependent not in doomed:
                doomed.add(dependent)
                stack.append(dependent)
    for key in doomed:
        updates.pop(key, None)

    removals = _topological(doomed, lambda key: [n for n in owned[key].needs if n in doomed], order)
    ops = [Op(REMOVE, key) for key in reversed(removals)]
    to_make = {key for key in wanted if key not in owned or key in doomed}
    for key in _topological(set(wanted), lambda key: list(wanted[key].needs), order):
        if key in to_make:
            ops.append(Op(CREATE, key))
        elif key in updates:
            ops.append(Op(UPDATE, key, updates[key]))
        elif key not in held:
            ops.append(Op(ADOPT, key))
    return ops


def _topological(keys: set[Key], needs: Callable[[Key], Iterable[Key]],
                 order: Callable[[Key], tuple[int, str, str, str]]) -> list[Key]:  # fmt: skip
    """Kahn's algorithm, the ready objects taken in `order`: what is needed comes first."""
    waiting = {key: {n for n in needs(key) if n in keys} for key in keys}
    users: dict[Key, list[Key]] = {}
    for key, its_needs in waiting.items():
        for need in its_needs:
            users.setdefault(need, []).append(key)
    ready = [(order(key), key) for key, its_needs in waiting.items() if not its_needs]
    heapq.heapify(ready)
    result: list[Key] = []
    while ready:
        _, key = heapq.heappop(ready)
        result.append(key)
        for user in users.get(key, ()):
            waiting[user].discard(key)
            if not waiting[user]:
                heapq.heappush(ready, (order(user), user))
    if len(result) != len(keys):
        raise ValueError("the objects' needs go round in a circle")
    return result
