"""Make sure configfs is mounted and the nvmet modules are loaded (storagetm.fabrics.lio.kernel
loads LIO's the same way)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from storagetm.errors import KernelError
from storagetm.system.log import Logger

log = Logger(__name__)

CONFIGFS = Path("/sys/kernel/config")
SYS_MODULE = Path("/sys/module")


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def ensure_configfs() -> None:
    if not _is_mounted(CONFIGFS):
        if not CONFIGFS.is_dir():
            _run("modprobe", "configfs")
        result = _run("mount", "-t", "configfs", "configfs", str(CONFIGFS))
        if result.returncode != 0 and not _is_mounted(CONFIGFS):
            raise KernelError(
                f"configfs is not available: {result.stderr.strip() or 'mount failed'}",
                hint="this kernel needs CONFIG_CONFIGFS_FS; run as root",
            )


def load_modules(modules: tuple[str, ...], hint: str) -> None:
    for module in modules:
        if (SYS_MODULE / module).is_dir():  # loaded (modprobe@ did it at boot) or built in
            continue
        result = _run("modprobe", module)
        if result.returncode != 0:
            raise KernelError(f"cannot load kernel module {module}: {result.stderr.strip() or 'modprobe failed'}",
                              hint=hint)  # fmt: skip


def ensure_nvmet(transport: str = "tcp") -> Path:
    """Mount configfs and load nvmet + nvmet_<transport> if needed; return the nvmet root."""
    ensure_configfs()
    nvmet = CONFIGFS / "nvmet"
    load_modules(("nvmet", f"nvmet_{transport}"), "this kernel needs CONFIG_NVME_TARGET and CONFIG_NVME_TARGET_TCP")
    if not nvmet.is_dir():
        raise KernelError(f"{nvmet} does not exist after loading nvmet", hint="check dmesg")
    return nvmet
