"""NVMe over Fabrics constants both sides use: the target engine and the initiator-side
helper. The standard library only (none at all): the helper must import it without the
rest of the engine."""

from __future__ import annotations

DISCOVERY_TRSVCID = 8009  # the well-known discovery port (IANA nvme-disc)
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"  # the well-known one every port serves
IO_TRSVCID = 4420  # the usual I/O port (IANA nvme)
UUID_NQN_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"  # a host NQN made from a UUID
