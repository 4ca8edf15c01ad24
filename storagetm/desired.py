"""The desired state: one pure function from what is wanted to every kernel object, the
backing layer's and each fabric's. No I/O: the same Want always gives the same objects."""

from __future__ import annotations

from collections.abc import Sequence

from storagetm.backing.layer import BackingLayer
from storagetm.fabrics import Fabric
from storagetm.model import Device, Want
from storagetm.reconcile.objects import Obj


def desired_state(want: Want, backing: BackingLayer, fabrics: Sequence[Fabric]) -> tuple[Obj, ...]:
    objs: list[Obj] = []
    devices: dict[str, Device] = {}
    for nqn, export in sorted(want.exports.items()):
        made, devices[nqn] = backing.objects(export)
        objs += made
    for fabric in fabrics:
        objs += fabric.objects(want, devices)
    return tuple(objs)
