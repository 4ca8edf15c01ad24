"""Load LIO (the kernel's SCSI target) and its iSCSI fabric. Without them NVMe/TCP still
works: the daemon says in one line that iSCSI is unavailable, and goes on."""

from __future__ import annotations

import os
from pathlib import Path

from storagetm.errors import KernelError
from storagetm.fabrics.nvmet.kernel import CONFIGFS, SYS_MODULE, ensure_configfs, load_modules

MODULES = ("target_core_mod", "target_core_iblock", "target_core_file", "iscsi_target_mod")


def lio_loaded(sys_module: Path = SYS_MODULE) -> bool:
    """LIO's modules are in the kernel: a previous instance may have made iSCSI targets."""
    return all((sys_module / module).is_dir() for module in MODULES)


def ensure_lio() -> Path:
    """Load the modules and make `target/iscsi` (the kernel registers the fabric when it is
    made, and keeps it: never removed); return the LIO root."""
    ensure_configfs()
    load_modules(MODULES, "this kernel needs CONFIG_TARGET_CORE, CONFIG_TCM_IBLOCK, CONFIG_TCM_FILEIO and "
                          "CONFIG_ISCSI_TARGET")  # fmt: skip
    root = CONFIGFS / "target"
    try:
        os.makedirs(root / "iscsi", exist_ok=True)
    except OSError as exc:
        raise KernelError(f"cannot make {root / 'iscsi'}: {exc.strerror}", hint="check dmesg") from exc
    return root
