"""NVMe/TCP with TLS 1.3 and a pre-shared key (NVMe/TCP TP 8011).

The kernel does the record layer, tlshd (Debian ktls-utils) the handshake. The target
finds the PSK by the identity the host presents, `NVMe0R01 <hostnqn> <subsysnqn>`, in
the kernel's `.nvme` keyring. So each (host, subsystem) pair needs its own derived key,
the discovery subsystem included, and storagetm must know the host NQN: it uses the
allowed hosts, or makes one up and shows it. nvme-cli derives and inserts the keys the
same way on both sides (`nvme check-tls-key --insert`), so both sides agree.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from storagetm import keys
from storagetm.auth import generated_host_nqn, read_credential
from storagetm.errors import StorageTMError

KEY_RE = re.compile(r"^NVMeTLSkey-1:0[12]:[A-Za-z0-9+/]+={0,2}:$")
CREDENTIAL_KEY = "storagetm.tls-key"
Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


class TLSError(StorageTMError):
    pass


def generate_key() -> str:
    """A configured PSK as `nvme gen-tls-key` prints it: 32 random bytes, hash 01 (SHA-256)."""
    return keys.generate("NVMeTLSkey-1:01:")


def check_key(key: str) -> str:
    return keys.check(key, KEY_RE, (32, 48), "TLS key", "NVMeTLSkey-1:01:<base64>: as `nvme gen-tls-key` makes it")


@dataclass(frozen=True)
class TLSConfig:
    """The PSK and the host NQNs it is derived for. No key: TLS is off."""

    key: str = ""
    hosts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    def without_secrets(self) -> TLSConfig:
        return TLSConfig(keys.hidden(self.key), self.hosts)


def resolve(enabled: bool, key: str, hosts: tuple[str, ...], previous: TLSConfig | None) -> TLSConfig:
    """Given key first, then the systemd credential, then the previous instance's (so a
    restart keeps initiators connected), else a new one; likewise the host NQNs."""
    if not enabled:
        return TLSConfig()
    before = previous if previous is not None and previous.enabled else TLSConfig()
    from_credential = read_credential(CREDENTIAL_KEY)
    key = key or (from_credential and check_key(from_credential)) or before.key or generate_key()
    return TLSConfig(key, hosts or before.hosts or (generated_host_nqn(),))


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def insert_key(hostnqn: str, subnqn: str, key: str, run: Runner = _run) -> None:
    """Put the PSK derived for (host, subsystem) into the kernel's .nvme keyring."""
    try:
        result = run(["nvme", "check-tls-key", "--insert", "-n", hostnqn, "-c", subnqn, "-d", key])
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    if result.returncode != 0:
        raise TLSError(f"cannot put the TLS key for {subnqn} into the kernel keyring: "
                       f"{(result.stderr or result.stdout).strip() or 'nvme check-tls-key failed'}",
                       hint="TLS needs nvme-cli and a kernel with CONFIG_NVME_KEYRING")  # fmt: skip


def ensure_handshake_daemon(run: Runner = _run) -> None:
    """tlshd does the handshakes; in the image it is started only when TLS is asked for."""
    try:
        if run(["systemctl", "is-active", "--quiet", "tlshd.service"]).returncode == 0:
            return
        result = run(["systemctl", "start", "tlshd.service"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    if result.returncode != 0:
        raise TLSError(f"tlshd is not running and cannot be started: {result.stderr.strip() or 'failed'}",
                       hint="install ktls-utils and start tlshd.service")  # fmt: skip
