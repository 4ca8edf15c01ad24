from __future__ import annotations

from pathlib import Path

import pytest

from storagetm.auth import AuthConfig, check_secret, generate_secret, resolve
from storagetm.configfs import Root
from storagetm.errors import StorageTMError, UsageError
from storagetm.identity import identity_for
from storagetm.model import Export, Exporter, listeners
from storagetm.screen import render
from storagetm.state import RunState
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_exports import BASE, file_disk

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def test_generated_secret_is_valid_dhhc1() -> None:
    secret = generate_secret()
    assert secret.startswith("DHHC-1:00:") and check_secret(secret) == secret
    broken = secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]
    with pytest.raises(UsageError, match="checksum"):
        check_secret(broken)
    with pytest.raises(UsageError, match="invalid DH-HMAC-CHAP secret"):
        check_secret("hunter2")


def test_resolve_keeps_previous_secret_and_host_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    first = resolve(True, "", "generate", (), None)
    assert first.enabled and first.secret and first.ctrl_secret and first.hosts[0].startswith("nqn.2014-08")
    assert resolve(True, "", "generate", (), first) == first
    assert resolve(False, "", "", (), first) == AuthConfig()


def test_credential_secret_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = generate_secret()
    (tmp_path / "storagetm.dhchap-secret").write_text(secret + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve(True, "", "", (HOST,), None).secret == secret


def test_auth_exports_only_to_allowed_hosts(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    exporter = Exporter(Root(fake.root, fake))
    exporter.open_ports(listeners(4420, ipv6=True))
    auth = AuthConfig(generate_secret(), generate_secret(), (HOST,))
    exporter.setup_hosts(auth)
    disk = file_disk(tmp_path, "a")
    export = Export(disk, identity_for(BASE, disk))
    assert exporter.apply({export.nqn: export}) == []
    sub = fake.root / "subsystems" / export.nqn
    assert (sub / "attr_allow_any_host").read_text().strip() == "0"
    assert (sub / "allowed_hosts" / HOST).is_symlink()
    assert (fake.root / "hosts" / HOST / "dhchap_key").read_text().strip() == auth.secret
    assert (fake.root / "hosts" / HOST / "dhchap_ctrl_key").read_text().strip() == auth.ctrl_secret
    text = render(RunState(exports={export.nqn: export}, auth=auth))
    assert "Only an initiator with the host NQN and secret below can READ AND WRITE" in text
    assert "not encrypted" in text
    exporter.teardown()
    assert list((fake.root / "hosts").iterdir()) == []


def test_foreign_host_entry_is_not_taken_over(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    root = Root(fake.root, fake)
    root.create_host(HOST)
    with pytest.raises(StorageTMError, match="already configured in nvmet by another program"):
        Exporter(root).setup_hosts(AuthConfig(generate_secret(), "", (HOST,)))
