"""What the firmware says about how this system was booted."""

from __future__ import annotations

from pathlib import Path

EFIVARS = Path("/sys/firmware/efi/efivars")
EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def secure_boot(efivars: Path = EFIVARS) -> bool | None:
    """Whether UEFI Secure Boot is on: True or False, None when there is no answer (booted
    without UEFI, or efivarfs not mounted)."""
    try:
        raw = (efivars / f"SecureBoot-{EFI_GLOBAL_GUID}").read_bytes()
    except OSError:
        return None
    # 4 bytes of attributes, then one byte: 1 = Secure Boot enforced.
    return len(raw) >= 5 and raw[4] == 1
