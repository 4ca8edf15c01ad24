"""Secrets stay with root: the state file's modes, `status` without and with
--show-secrets, and one clear line for the commands that need root."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from storagetm import state
from storagetm.cli import main, serve_parser
from storagetm.console.screen import Screen
from storagetm.errors import ConfigfsError, ExitCode
from storagetm.fabrics.nvmet.configfs import Root
from storagetm.reconcile.objects import digest
from storagetm.security.auth import AuthConfig, generate_secret
from storagetm.security.keys import on_command_line
from storagetm.security.tls import TLSConfig, derive_psk, generate_key
from storagetm.state import RunState
from storagetm.system import log
from storagetm.system.network import Address
from tests.unit.test_exports import ANCHOR, Target, export_of, file_disk

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "run" / "storagetm" / "state.json"
    monkeypatch.setattr(state, "STATE_FILE", path)
    yield path


def secret_state() -> RunState:
    return RunState(
        pid=os.getpid(),
        auth=AuthConfig(generate_secret(), generate_secret(), (HOST,)),
        tls=TLSConfig(generate_key(), (HOST,)),
        addresses=[Address("ipv4", "192.0.2.5", "eth0", False)],
    )


def test_state_file_is_root_only_from_the_start_whatever_the_umask(
    state_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((mode(Path(src)), mode(Path(src).parent)))  # what the file was before it got its name
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old_umask = os.umask(0)
    try:
        state.save(secret_state())
    finally:
        os.umask(old_umask)
    assert seen == [(0o600, 0o700)]
    assert (mode(state_file), mode(state_file.parent)) == (0o600, 0o700)


def test_a_short_write_never_leaves_half_a_state(state_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full tmpfs takes part of a write: the rest is written, or (nothing taken) the old
    state stays as it was instead of a truncated one replacing it."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    saved = secret_state()
    state.save(saved)
    assert state.load() == saved
    before = state_file.read_bytes()
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="No space left"):
        state.save(replace(saved, pid=4242))
    assert state_file.read_bytes() == before
    assert [p.name for p in state_file.parent.iterdir()] == [state_file.name]  # no temp file behind


def test_a_state_directory_left_world_readable_becomes_0700(state_file: Path) -> None:
    state_file.parent.mkdir(parents=True)
    state_file.parent.chmod(0o755)
    state.save(secret_state())
    assert mode(state_file.parent) == 0o700


def refuse_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """What an unprivileged user meets: the 0700 directory (the suite runs as root)."""
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(self)

    monkeypatch.setattr(Path, "read_text", read_text)


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_as_non_root_say_they_need_root(
    command: str, state_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state.save(secret_state())
    refuse_reading(monkeypatch, state_file)
    assert main([command]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"storagetm: storagetm {command} needs root: the state file holds the secrets")
    assert "unexpected error" not in err and len(err.splitlines()) == 1


def test_stop_refused_by_the_kernel_says_it_needs_root(
    state_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state file an older storagetm left readable: the signal is what fails."""
    state.save(secret_state())

    def kill(pid: int, signum: int) -> None:
        if signum != 0:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert main(["stop"]) == ExitCode.USAGE
    assert "storagetm stop needs root" in capsys.readouterr().err


def test_status_hides_the_secrets_unless_asked(state_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    current = secret_state()
    state.save(current)
    secrets = (current.auth.secret, current.auth.ctrl_secret, current.tls.key)
    assert main(["status"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert not any(secret in out for secret in secrets)
    assert "--dhchap-secret=(hidden)" in out and "storagetm status --show-secrets" in out
    assert main(["status", "--json"]) == ExitCode.OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["auth"]["secret"] == shown["auth"]["ctrl_secret"] == shown["tls"]["key"] == "(hidden)"
    assert shown["auth"]["hosts"] == [HOST] and shown["tls"]["enabled"]
    assert main(["status", "--show-secrets", "--json"]) == ExitCode.OK
    shown = json.loads(capsys.readouterr().out)
    assert (shown["auth"]["secret"], shown["auth"]["ctrl_secret"], shown["tls"]["key"]) == secrets
    assert main(["status", "--show-secrets"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert all(secret in out for secret in secrets) and "(hidden)" not in out
    # The state file itself keeps them: a restarted daemon needs them to keep initiators connected.
    loaded = state.load()
    assert loaded is not None and (loaded.auth.secret, loaded.auth.ctrl_secret, loaded.tls.key) == secrets


def test_secrets_from_files_never_are_on_the_command_line(tmp_path: Path) -> None:
    secret, key = generate_secret(), generate_key()
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "key").write_text(key)
    argv = [f"--dhchap-secret=@{tmp_path / 'secret'}", f"--dhchap-ctrl-secret=@{tmp_path / 'secret'}",
            f"--tls-key=@{tmp_path / 'key'}", "--all"]  # fmt: skip
    args = serve_parser().parse_args(argv)
    assert (args.dhchap_secret, args.dhchap_ctrl_secret, args.tls_key) == (secret, secret, key)
    assert not on_command_line(argv)


def test_an_unreadable_secret_file_is_one_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([f"--dhchap-secret=@{tmp_path / 'missing'}", "--all"])
    assert info.value.code == ExitCode.USAGE
    assert f"cannot read the DH-HMAC-CHAP secret from {tmp_path / 'missing'}" in capsys.readouterr().err


def test_a_secret_on_the_command_line_is_warned_about_once_without_its_value(
    logged: list[log.Record], capsys: pytest.CaptureFixture[str]
) -> None:
    secret, key = generate_secret(), generate_key()
    assert main(["--dhchap-secret", secret, f"--tls-key={key}"]) == ExitCode.USAGE  # no disks: stops early
    warnings = [r.message for r in logged if r.level >= log.WARNING]
    assert len(warnings) == 1 and "visible to every user" in warnings[0] and "@FILE" in warnings[0]
    assert secret not in warnings[0] + capsys.readouterr().err and key not in warnings[0]


def test_a_rejected_secret_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    wrong = generate_secret()[:-6] + "AAAA=:"
    with pytest.raises(SystemExit):
        main([f"--dhchap-secret={wrong}", "--all"])
    err = capsys.readouterr().err
    assert "invalid DH-HMAC-CHAP secret" in err and wrong not in err


def test_a_failed_secret_write_to_configfs_does_not_show_the_secret(
    tmp_path: Path, logged: list[log.Record]
) -> None:
    target = Target(tmp_path)
    target.fake.fail_on["dhchap_key"] = errno.EINVAL
    auth = AuthConfig(generate_secret(), "", (HOST,))
    export = export_of(file_disk(tmp_path, "a"))
    failures = target.apply(export, auth=auth)
    host_failure = next(f for f in failures if f.key == ("nvmet-host", HOST))
    line = host_failure.one_line()
    assert auth.secret not in line and line.endswith("dhchap_key to the secret: Invalid argument")
    assert not any(auth.secret in f.one_line() for f in failures)
    assert logged and not any(auth.secret in r.message for r in logged)
    assert not (target.fake.root / "hosts" / HOST).exists()  # the half-made host is gone
    assert target.names("subsystems") == [ANCHOR]  # and the export that needs it is not made
    target.fake.fail_on["attr_model"] = errno.EINVAL  # other values are still shown
    with pytest.raises(ConfigfsError, match="attr_model to 'Disk'"):
        Root(target.fake.root, target.fake).create_subsystem("nqn.2014-08.org.example:a").set("attr", "model", "Disk")


def test_the_ownership_record_never_holds_a_secret(tmp_path: Path) -> None:
    """The record keeps a secret attribute by its digest only: a change is still seen
    (and written in place), the secret itself never reaches /run."""
    target = Target(tmp_path)
    auth = AuthConfig(generate_secret(), generate_secret(), (HOST,))
    key = generate_key()
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, auth=auth, tls=TLSConfig(key, (HOST,))) == []
    record = target.journal_path.read_text()
    _, psk = derive_psk(key, HOST, export.nqn)
    for secret in (auth.secret, auth.ctrl_secret, key, psk.hex()):
        assert secret not in record
    assert digest(auth.secret) in record
    assert stat.S_IMODE(target.journal_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.journal_path.parent.stat().st_mode) == 0o700
    target.restart()
    changed = AuthConfig(generate_secret(), auth.ctrl_secret, (HOST,))
    assert target.apply(export, auth=changed, tls=TLSConfig(key, (HOST,))) == []
    assert f"update nvmet-host {HOST} (dhchap_key)" in map(str, target.reconciler.last_ops)
    assert changed.secret not in target.journal_path.read_text()


def test_the_screen_on_standard_output_hides_the_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --console the screen goes to standard output, often a journal others read."""
    shown = secret_state()
    Screen().show(shown)
    out = capsys.readouterr().out
    assert "nvme connect-all" in out
    for secret in (shown.auth.secret, shown.auth.ctrl_secret, shown.tls.key):
        assert secret not in out


def test_the_interpreters_own_digests_give_hashlibs_and_hmacs_results() -> None:
    """storagetm.security.digest (no OpenSSL) derives byte for byte what hashlib and hmac do."""
    import hashlib
    import hmac
    import uuid

    from storagetm.security import digest

    for key in (b"", b"k", bytes(range(200))):  # shorter and longer than a block
        for algorithm, reference in ((digest.sha256, hashlib.sha256), (digest.sha384, hashlib.sha384)):
            assert digest.hmac_digest(key, b"message", algorithm) == hmac.new(key, b"message", reference).digest()
    assert digest.sha256_hex("storagetm") == hashlib.sha256(b"storagetm").hexdigest()
    namespace = uuid.UUID("4f1d6a40-4f5e-4c5b-9d55-73746f726167")
    assert digest.uuid5(namespace, "nqn.2023-10.io.systemd:x") == uuid.uuid5(namespace, "nqn.2023-10.io.systemd:x")
