"""NVMe in-band authentication (DH-HMAC-CHAP): secrets and the hosts allowed in.

nvmet authenticates only hosts it knows (configfs `hosts/<hostnqn>` with a `dhchap_key`,
linked into each subsystem's `allowed_hosts`, with `attr_allow_any_host=0`); a subsystem
open to any host does no authentication at all. So with authentication on, storagetm
either uses the host NQNs the operator allows, or makes one up and shows it with the
secret: the initiator then connects with `--hostnqn=… --dhchap-secret=…`.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import NamedTuple

from storagetm.security import keys

SECRET_RE = re.compile(r"^DHHC-1:0[0-3]:[A-Za-z0-9+/]+={0,2}:$")
CREDENTIAL_SECRET = "storagetm.dhchap-secret"
CREDENTIAL_CTRL_SECRET = "storagetm.dhchap-ctrl-secret"


def generate_secret() -> str:
    """A DHHC-1 secret as `nvme gen-dhchap-key` makes it: 32 random bytes, no key
    transformation (the 00 field)."""
    return keys.generate("DHHC-1:00:")


def check_secret(secret: str, what: str = "DH-HMAC-CHAP secret") -> str:
    return keys.check(secret, SECRET_RE, (32, 48, 64), what, "DHHC-1:00:<base64>: as `nvme gen-dhchap-key` makes it")


def secret_argument(value: str, what: str = "DH-HMAC-CHAP secret") -> str:
    """--dhchap-secret=SECRET or =@FILE."""
    return check_secret(keys.from_argument(value, what), what)


def generated_host_nqn() -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"


class AuthConfig(NamedTuple):  # the initiator side imports this module: the standard library only
    """Who may connect, and with which secrets. `hosts` empty means anyone, unauthenticated."""

    secret: str = ""
    ctrl_secret: str = ""  # bidirectional: the initiator checks the target too
    hosts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    def without_secrets(self) -> AuthConfig:
        return AuthConfig(keys.hidden(self.secret), keys.hidden(self.ctrl_secret), self.hosts)


def resolve(
    enabled: bool, secret: str, ctrl_secret: str, hosts: tuple[str, ...], previous: AuthConfig | None
) -> AuthConfig:
    """The secrets and hosts to use: given ones first, then systemd credentials, then what a
    previous instance used (so a restart keeps initiators connected), else new ones."""
    if not enabled:
        return AuthConfig()
    before = previous if previous is not None and previous.enabled else AuthConfig()
    from_credential = read_credential(CREDENTIAL_SECRET)
    secret = secret or (from_credential and check_secret(from_credential)) or before.secret or generate_secret()
    if ctrl_secret == "generate":
        from_credential = read_credential(CREDENTIAL_CTRL_SECRET)
        ctrl_secret = (from_credential and check_secret(from_credential, "controller secret")) or (
            before.ctrl_secret or generate_secret()
        )
    return AuthConfig(secret, ctrl_secret, hosts or before.hosts or (generated_host_nqn(),))


def read_credential(name: str) -> str:
    """A systemd credential (LoadCredential=/ImportCredential=/SetCredential=), or ''."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return ""
    try:
        return (Path(directory) / name).read_text().strip()
    except OSError:
        return ""
