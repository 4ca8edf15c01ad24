"""The fabrics an export is offered on. Each turns the wanted exports (and the device
the backing layer made for each) into kernel objects, and brings the drivers that make
them; the reconciler knows none of their kinds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from storagetm.model import Device, Want
from storagetm.reconcile.objects import Driver, Obj


class Fabric(Protocol):
    @property
    def name(self) -> str: ...

    def objects(self, want: Want, devices: Mapping[str, Device]) -> list[Obj]:
        """The fabric's objects for `want`: pure, no I/O."""

    def drivers(self) -> Sequence[Driver]: ...
