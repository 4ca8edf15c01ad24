"""The other machine's side: find storagetm targets, connect their disks, copy them.

Runs with nothing but Python and nvme-cli: this package imports only the standard library
and the storagetm modules that do (tests/unit/test_initiator_imports.py checks it), so the
one-file download (`storagetm.pyz`) works on any Linux.
"""
