"""The VM harness shared by the VM suite (tests/vm), the benchmarks (bench/) and the demo
(ci/demo.py): QEMU machines under TCG, the target + initiator pair linked over a unix
socket, what the initiator does with nvme-cli, link captures and network-boot servers.

- `machine`: one QEMU VM (`VM`, `Disk`), its console, debug shell, QMP and hot-plug;
- `pair`: the built image, the target and initiator VMs and `vm_pair()`, which boots both;
- `initiator`: connecting with nvme-cli and reading the target's screen;
- `capture`: packet captures of the link;
- `netboot`: PXE and UEFI HTTP boot servers;
- `wait`: `until()`, the one poll-until-deadline loop."""

from __future__ import annotations


class VMError(AssertionError):
    """A VM did not do what the harness waited for (an AssertionError, so a test that meets
    it fails rather than errors)."""
