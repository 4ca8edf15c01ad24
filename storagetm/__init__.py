"""storagetm: export a machine's disks over NVMe/TCP (target disk mode for Linux)."""

__version__ = "0.1.0"
