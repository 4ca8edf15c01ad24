"""The value a desired state is made of: kernel objects, each with a key, the attributes
it is made with, and the objects it needs; and the protocol a driver of one kind follows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from msgspec import Struct, field

from storagetm.security.digest import sha256_hex

Key = tuple[str, str]  # (kind, name): unique in a desired state
Facts = Mapping[str, str]  # what making an object found out (a loop device, a port id)
FactsOf = Callable[[Key], Facts]


class Obj(Struct, frozen=True):
    """One kernel object storagetm wants. `attrs` are what it is made with: a difference
    between the desired and the owned object means it is remade, unless the driver can
    change that attribute in place (`Driver.mutable`). `needs`: made before it, removed
    after it. `group`: the export it belongs to ("" for objects every export shares); a
    failure undoes the group, never another."""

    kind: str
    name: str
    attrs: tuple[tuple[str, str], ...] = ()
    needs: tuple[Key, ...] = ()
    group: str = ""
    secret: frozenset[str] = field(default_factory=frozenset)  # attrs never written to the record

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    def attr(self, name: str, default: str = "") -> str:
        return next((value for key, value in self.attrs if key == name), default)

    @property
    def recorded_attrs(self) -> dict[str, str]:
        """The attributes as the ownership record keeps them: a secret by its digest only."""
        return {key: (digest(value) if key in self.secret else value) for key, value in self.attrs}


def digest(value: str) -> str:
    return "sha256:" + sha256_hex(value)


def make(kind: str, name: str, attrs: Mapping[str, str] | None = None, needs: Iterable[Key] = (),
         group: str = "", secret: Iterable[str] = ()) -> Obj:  # fmt: skip
    return Obj(kind, name, tuple(sorted((attrs or {}).items())), tuple(needs), group, frozenset(secret))


class Driver(Protocol):
    """Makes, finds and removes the kernel objects of one kind."""

    kind: str
    rank: int  # among objects free to go in any order, lower ranks are made first
    mutable: frozenset[str]  # attributes `update` can change on a live object

    def present(self, obj: Obj, facts: Facts) -> bool:
        """Whether the kernel holds the object (for an owned one, as its facts say)."""

    def foreign(self, obj: Obj) -> bool:
        """Whether another program holds an object of this name: it is never touched."""

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        """Make it, or raise and leave nothing behind; return what a later remove needs."""

    def update(self, obj: Obj, facts: Facts, changed: frozenset[str]) -> Facts:
        """Change the `changed` attributes (all in `mutable`) of the live object."""

    def remove(self, obj: Obj, facts: Facts) -> None:
        """Remove it; an object already gone is no error."""

    def adopt(self, obj: Obj, facts: Facts) -> None:
        """Take over an object a previous instance made (take what the process holds for it)."""

    def discard_partial(self, obj: Obj) -> None:
        """Remove whatever a make that was cut short (SIGKILL) may have left of the object,
        found by its name, when its facts were never recorded."""


class BaseDriver:
    """Defaults: nothing is mutable, adoption holds nothing, a cut-short make is removed
    as the object itself."""

    kind = ""
    rank = 50
    mutable: frozenset[str] = frozenset()

    def present(self, obj: Obj, facts: Facts) -> bool:
        raise NotImplementedError

    def foreign(self, obj: Obj) -> bool:
        return self.present(obj, {})

    def create(self, obj: Obj, facts_of: FactsOf) -> Facts:
        raise NotImplementedError

    def remove(self, obj: Obj, facts: Facts) -> None:
        raise NotImplementedError

    def update(self, obj: Obj, facts: Facts, changed: frozenset[str]) -> Facts:
        raise NotImplementedError(f"{self.kind} {obj.name}: cannot change {', '.join(sorted(changed))} in place")

    def adopt(self, obj: Obj, facts: Facts) -> None:
        return None

    def discard_partial(self, obj: Obj) -> None:
        self.remove(obj, {})
