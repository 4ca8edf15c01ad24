"""The plan, table-driven: given desired and owned objects, the exact operations in order."""

from __future__ import annotations

import pytest

from storagetm.reconcile.journal import MADE, MAKING, REMOVING, Owned
from storagetm.reconcile.objects import Obj, make
from storagetm.reconcile.plan import Kinds, plan

KINDS = Kinds(rank={"port": 1, "subsys": 2, "ns": 3, "link": 4}, mutable={"subsys": frozenset({"any"})})

PORT = make("port", "4420", {"trsvcid": "4420"})
SUB = make("subsys", "a", {"any": "1", "model": "M"}, group="a")
NS = make("ns", "a", {"path": "/dev/sda"}, needs=(SUB.key,), group="a")
LINK = make("link", "4420 a", needs=(PORT.key, SUB.key, NS.key), group="a")
SUB_B = make("subsys", "b", {"any": "1"}, group="b")


def owned(*objs: Obj, state: str = MADE) -> dict[tuple[str, str], Owned]:
    return {o.key: Owned.of(o, state) for o in objs}


def ops(desired: tuple[Obj, ...], have: dict[tuple[str, str], Owned], held: tuple[Obj, ...] = ()) -> list[str]:
    return [str(op) for op in plan(desired, have, KINDS, {o.key for o in held})]


ALL = (PORT, SUB, NS, LINK)
CASES = [
    ("start from nothing: needs first, then by rank", ALL, {}, (),
     ["create port 4420", "create subsys a", "create ns a", "create link 4420 a"]),
    ("all made by this process: nothing to do", ALL, owned(*ALL), ALL, []),
    ("a previous instance made them: adopt each once", ALL, owned(*ALL), (),
     ["adopt port 4420", "adopt subsys a", "adopt ns a", "adopt link 4420 a"]),
    ("teardown: dependents first", (), owned(*ALL), ALL,
     ["remove link 4420 a", "remove ns a", "remove subsys a", "remove port 4420"]),
    ("a mutable attribute changes in place", (PORT, make("subsys", "a", {"any": "0", "model": "M"}, group="a"),
                                              NS, LINK), owned(*ALL), ALL, ["update subsys a (any)"]),
    ("an immutable attribute remakes it and what needs it",
     (PORT, make("subsys", "a", {"any": "1", "model": "N"}, group="a"), NS, LINK), owned(*ALL), ALL,
     ["remove link 4420 a", "remove ns a", "remove subsys a", "create subsys a", "create ns a",
      "create link 4420 a"]),
    ("a new backing device remakes the namespace only, and the link that needs it",
     (PORT, SUB, make("ns", "a", {"path": "/dev/mapper/x"}, needs=(SUB.key,), group="a"), LINK), owned(*ALL), ALL,
     ["remove link 4420 a", "remove ns a", "create ns a", "create link 4420 a"]),
    ("half made (SIGKILL between making and made): removed and made anew", ALL,
     owned(PORT, SUB, NS) | owned(LINK, state=MAKING), (PORT, SUB, NS), ["remove link 4420 a", "create link 4420 a"]),
    ("half removed: removed again", (PORT,), owned(PORT) | owned(SUB, state=REMOVING), (PORT,), ["remove subsys a"]),
    ("another export comes: only its objects", (*ALL, SUB_B), owned(*ALL), ALL, ["create subsys b"]),
    ("the port changes: every link goes first, the exports stay",
     (make("port", "5000", {"trsvcid": "5000"}), SUB, NS, make("link", "5000 a", needs=(("port", "5000"), SUB.key,
                                                                                       NS.key), group="a")),
     owned(*ALL), ALL, ["remove link 4420 a", "remove port 4420", "create port 5000", "create link 5000 a"]),
]


@pytest.mark.parametrize(("desired", "have", "held", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(desired: tuple[Obj, ...], have: dict[tuple[str, str], Owned], held: tuple[Obj, ...],
              expected: list[str]) -> None:  # fmt: skip
    assert ops(desired, have, held) == expected


def test_secret_attributes_compare_by_digest() -> None:
    host = make("port", "h", {"key": "DHHC-1:00:secret:"}, secret=("key",))
    have = owned(host)
    assert "secret" not in str(have[host.key].attrs)
    assert ops((host,), have, (host,)) == []
    changed = make("port", "h", {"key": "DHHC-1:00:other:"}, secret=("key",))
    assert ops((changed,), have, (host,)) == ["remove port h", "create port h"]


def test_a_need_that_is_not_desired_is_a_bug() -> None:
    with pytest.raises(ValueError, match="not desired"):
        plan((NS,), {}, KINDS)


def test_the_same_inputs_give_the_same_order() -> None:
    many = [make("subsys", name, group=name) for name in "dcba"]
    assert ops(tuple(many), {}) == [f"create subsys {n}" for n in "abcd"]
