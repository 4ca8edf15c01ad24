from __future__ import annotations

from pathlib import Path

import pytest

from storagetm.console.screen import render
from storagetm.errors import UsageError
from storagetm.security.auth import AuthConfig, check_secret, generate_secret, resolve
from storagetm.state import RunState
from tests.unit.test_exports import ANCHOR, Target, export_of, file_disk

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
    target = Target(tmp_path)
    auth = AuthConfig(generate_secret(), generate_secret(), (HOST,))
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, auth=auth) == []
    sub = target.fake.root / "subsystems" / export.nqn
    assert (sub / "attr_allow_any_host").read_text().strip() == "0"
    assert (sub / "allowed_hosts" / HOST).is_symlink()
    assert (target.fake.root / "hosts" / HOST / "dhchap_key").read_text().strip() == auth.secret
    assert (target.fake.root / "hosts" / HOST / "dhchap_ctrl_key").read_text().strip() == auth.ctrl_secret
    assert target.names("subsystems", ANCHOR, "allowed_hosts") == []  # the anchor lets nobody in
    text = render(RunState(exports={export.nqn: export}, auth=auth))
    assert "Only an initiator with the host NQN and secret below can READ AND WRITE" in text
    assert "not encrypted" in text
    target.reconciler.teardown()
    assert list((target.fake.root / "hosts").iterdir()) == []


def test_auth_turned_off_removes_the_hosts_and_opens_the_subsystem_in_place(tmp_path: Path) -> None:
    target = Target(tmp_path)
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, auth=AuthConfig(generate_secret(), "", (HOST,))) == []
    assert target.apply(export) == []
    assert target.names("hosts") == [] and target.names("subsystems", export.nqn, "allowed_hosts") == []
    assert (target.fake.root / "subsystems" / export.nqn / "attr_allow_any_host").read_text().strip() == "1"
    assert f"update nvmet-subsystem {export.nqn} (allow_any_host)" in map(str, target.reconciler.last_ops)
    assert target.names("ports", "4420", "subsystems") == sorted([export.nqn, ANCHOR])


def test_a_new_secret_is_written_in_place(tmp_path: Path) -> None:
    """The host stays (and its links with it): a connected initiator is not dropped."""
    target = Target(tmp_path)
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, auth=AuthConfig(generate_secret(), "", (HOST,))) == []
    new = generate_secret()
    target.fake.links.clear()
    assert target.apply(export, auth=AuthConfig(new, "", (HOST,))) == []
    assert [str(op) for op in target.reconciler.last_ops] == [f"update nvmet-host {HOST} (dhchap_key)"]
    assert (target.fake.root / "hosts" / HOST / "dhchap_key").read_text().strip() == new
    assert target.fake.links == []


def test_foreign_host_entry_is_not_taken_over(tmp_path: Path) -> None:
    target = Target(tmp_path)
    target.root.create_host(HOST)
    export = export_of(file_disk(tmp_path, "a"))
    failures = target.apply(export, auth=AuthConfig(generate_secret(), "", (HOST,)))
    assert any("already in the kernel, made by another program" in f.message for f in failures)
    assert export.nqn in {f.group for f in failures}  # it needs that host: not exported
    assert (target.fake.root / "hosts" / HOST / "dhchap_key").read_text().strip() == ""  # not written
    assert target.names("subsystems") == [ANCHOR]
    target.reconciler.teardown()
    assert target.names("hosts") == [HOST]  # still theirs
