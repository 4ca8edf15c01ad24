"""Bad options never widen access: a bad value of an option that limits who gets in or
what may be written exports less (read-only, or nothing), says so first on the screen,
and never shows a secret it rejected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from storagetm.backing.modes import Mode
from storagetm.cli import main, serve_parser, settings_from
from storagetm.config.options import apply_kernel_cmdline, split_kernel_cmdline, with_credentials
from storagetm.config.settings import Settings, parse_port
from storagetm.console.screen import Screen, render
from storagetm.disks.disk import Disk
from storagetm.disks.policy import Reason, SystemFacts
from storagetm.errors import ExitCode, UsageError
from storagetm.security.auth import CREDENTIAL_CTRL_SECRET, CREDENTIAL_SECRET, check_secret, generate_secret
from storagetm.security.tls import CREDENTIAL_KEY, check_key
from storagetm.selection import plan
from storagetm.state import RunState
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_daemon import attached

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
TLS_KEY = "NVMeTLSkey-1:01:YJGms0ICBKqLlhlb0AjrX6v7lKNOBNkIr1uz8Gi0sF9Ie3KZ:"  # from `nvme gen-tls-key`
SDA = Disk(name="sda", devnode="/dev/sda", devnum=1, devtype="disk", size=1 << 30, serial="A")
SDB = Disk(name="sdb", devnode="/dev/sdb", devnum=2, devtype="disk", size=1 << 30, serial="B")


def one_wrong(secret: str) -> str:
    return secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]


def kernel(cmdline: str, settings: Settings | None = None) -> tuple[Settings, list[str]]:
    return apply_kernel_cmdline(settings or Settings(all_disks=True), cmdline)


@pytest.mark.parametrize("option, value", [
    ("auth", one_wrong(generate_secret())),
    ("auth_ctrl", one_wrong(generate_secret())),
    ("tls", TLS_KEY.replace("YJG", "YJH")),  # bad CRC
    ("auth", "DHHC-1:00:abc:"),  # bad base64: crashed the daemon
    ("tls", "NVMeTLSkey-1:01:abcde:"),
    ("auth", "hunter2maybe"),
])  # fmt: skip
def test_a_bad_secret_or_key_exports_nothing_and_is_not_shown(option: str, value: str) -> None:
    settings, problems = kernel(f"storagetm.{option}={value}")
    assert settings.refusals == (f"storagetm.{option}",)
    assert plan([SDA], settings, SystemFacts(), BASE).exports == {}
    (problem,) = problems
    assert problem.startswith(f"storagetm.{option} is not valid: ")
    assert problem.endswith("— exporting nothing; fix the boot option")
    key_part = value.split(":")[2] if value.count(":") >= 3 else value
    assert value not in problem and key_part not in problem


def test_malformed_base64_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match="invalid DH-HMAC-CHAP secret: not valid base64"):
        check_secret("DHHC-1:00:abc:")
    with pytest.raises(UsageError, match="invalid TLS key: not valid base64"):
        check_key("NVMeTLSkey-1:01:abcde:")


def test_a_rejected_secret_on_the_command_line_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--all", "--dhchap-secret", "DHHC-1:00:c2VjcmV0:"])
    assert info.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "invalid DH-HMAC-CHAP secret" in err and "c2VjcmV0" not in err


def test_bad_allow_hosts_exports_nothing() -> None:
    settings, problems = kernel(f"storagetm.allow_hosts={HOST},host2")
    assert settings.refusals == ("storagetm.allow_hosts",)
    assert "not an NQN: 'host2'" in problems[0] and problems[0].endswith("— exporting nothing; fix the boot option")


@pytest.mark.parametrize("cmdline", ["storagetm.disks=all,sdb", "storagetm.disks=", "storagetm.disks=,",
                                     "storagetm.disks"])  # fmt: skip
def test_bad_disks_exports_nothing(cmdline: str) -> None:
    settings, problems = kernel(cmdline)
    assert settings.refusals == ("storagetm.disks",) and len(problems) == 1
    result = plan([SDA, SDB], settings, SystemFacts(), BASE)
    assert result.exports == {} and {r for _, r in result.not_exported} == {Reason.BAD_OPTION}


def test_a_bad_default_mode_makes_every_disk_read_only() -> None:
    for cmdline in ("storagetm.mode=read_only", "storagetm.mode=read_only,sdb=rw", "storagetm.mode=",
                    "storagetm.mode", "storagetm.mode==ro", "storagetm.mode=bogus storagetm.mode=rw"):  # fmt: skip
        settings, problems = kernel(cmdline)
        assert {settings.mode_for(SDA), settings.mode_for(SDB)} == {Mode.READ_ONLY}, cmdline
        assert problems[0].endswith("— exporting every disk read-only; fix the boot option"), cmdline
        assert settings.refusals == ()
    _, problems = kernel("storagetm.mode=read_only")
    assert problems == ["storagetm.mode='read_only' is not valid: unknown mode 'read_only' (use rw, ro or "
                        "snapshot); per disk: DISK=MODE — exporting every disk read-only; fix the boot option"]


def test_a_bad_disk_mode_makes_that_disk_read_only() -> None:
    settings, problems = kernel("storagetm.mode=ro,sdb=snapshto")
    assert settings.mode_for(SDA) is Mode.READ_ONLY and settings.mode_for(SDB) is Mode.READ_ONLY
    settings, problems = kernel("storagetm.mode=sdb=snapshto,sda=snapshot storagetm.mode=sdb=rw")
    assert settings.mode_for(SDA) is Mode.SNAPSHOT and settings.mode_for(SDB) is Mode.READ_ONLY
    assert problems[0].endswith("— exporting sdb read-only; fix the boot option")


def test_unknown_option_exports_nothing_and_hides_its_value() -> None:
    secret = generate_secret()
    settings, problems = kernel(f"storagetm.mdoe=ro storagetm.atuh={secret}")
    assert settings.refusals == ("storagetm.mdoe", "storagetm.atuh")
    assert problems[0] == ("unknown option storagetm.mdoe (did you mean storagetm.mode?) — exporting nothing; "
                           "fix or remove it")  # fmt: skip
    assert "storagetm.auth?" in problems[1] and secret not in problems[1]


def test_auth_ctrl_alone_turns_authentication_on() -> None:
    settings, _ = kernel("storagetm.auth_ctrl=1")
    assert settings.auth and settings.dhchap_ctrl_secret == "generate"
    from_cli, _ = settings_from(serve_parser().parse_args(["--all", "--dhchap-ctrl-secret"]))
    assert from_cli.auth and from_cli.dhchap_ctrl_secret == "generate"


def test_zero_never_turns_off_what_another_option_asked_for() -> None:
    settings, problems = kernel(f"storagetm.allow_hosts={HOST} storagetm.auth=0 storagetm.tls=1 storagetm.tls=0")
    assert settings.auth and settings.allow_hosts == (HOST,) and settings.tls and problems == []
    settings, _ = kernel("storagetm.auth_ctrl=0 storagetm.auth=0", Settings(auth=True, dhchap_ctrl_secret="generate"))
    assert settings.auth and settings.dhchap_ctrl_secret == "generate"


def test_bad_announce_does_not_announce() -> None:
    settings, problems = kernel("storagetm.announce=maybe", Settings(announce=True))
    assert not settings.announce and problems[0].endswith("— not announcing; fix the boot option")


def test_port_with_non_ascii_digits_is_one_message() -> None:
    for value in ("²", "٣", "4420²", "99999"):
        settings, problems = kernel(f"storagetm.port={value}")
        assert settings.port == 4420 and len(problems) == 1 and "expects a TCP port number" in problems[0]
        with pytest.raises(ValueError):
            parse_port(value)


def test_kernel_cmdline_is_split_as_the_kernel_does() -> None:
    assert split_kernel_cmdline("systemd.hostname=bob's storagetm.mode=ro") == [
        "systemd.hostname=bob's", "storagetm.mode=ro"]  # fmt: skip
    assert split_kernel_cmdline(' a="b c"  "d e"f\tg\\ h "unclosed i') == ["a=b c", "d ef", "g\\", "h", "unclosed i"]
    settings, problems = kernel("systemd.hostname=bob's storagetm.mode=ro")
    assert settings.mode is Mode.READ_ONLY and problems == []
    settings, problems = kernel('storagetm.disks="sdb,sdc" x="storagetm.disks=all storagetm.auth=0"')
    assert settings.devices == ("sdb", "sdc") and not settings.all_disks and problems == []


def test_dash_and_underscore_are_alike_in_names() -> None:
    settings, problems = kernel(f"storagetm.snapshot-size=64M storagetm.allow-hosts={HOST} storagetm.auth-ctrl=1")
    assert problems == [] and settings.snapshot_size == 64 << 20 and settings.allow_hosts == (HOST,)
    assert settings.dhchap_ctrl_secret == "generate"


def test_bad_values_on_the_command_line_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """The same converters as at boot; on the command line a bad value stops storagetm (exit 2)."""
    for argv in (["--mode", ""], ["--mode", "=ro"], ["--mode", "ro,sdb=snapshto"], ["--port", "²"],
                 ["--snapshot-size", "1K"], ["--allow-host", "host2"]):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            serve_parser().parse_args(["--all", *argv])
        assert info.value.code == ExitCode.USAGE
        assert f"argument {argv[0]}: " in capsys.readouterr().err.splitlines()[-1]


def test_mode_for_a_disk_that_is_not_there_is_warned() -> None:
    settings, _ = kernel("storagetm.mode=ro,sdz=rw,sdb=snapshot")
    problems = plan([SDA, SDB], settings, SystemFacts(), BASE).problems
    assert problems == ["no disk matches 'sdz' of the mode option (yet); it is read-write if it appears"]


def test_screen_names_the_bad_option_first_and_exports_nothing(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    disk = Disk(name="disk.img", devnode=str(image), devnum=0, devtype="file", size=1 << 20, serial="F1")
    settings, problems = kernel(f"storagetm.auth={one_wrong(generate_secret())} storagetm.mode=read_only",
                                Settings(devices=(str(image),)))  # fmt: skip
    fake = FakeConfigfs(tmp_path / "configfs")
    daemon = attached(tmp_path, settings, fake, Screen(terminal=False), startup_problems=problems)
    daemon.disks = {disk.devnode: disk}
    daemon.export_wanted()
    assert daemon.state.exports == {} and list((fake.root / "subsystems").iterdir()) == []
    # Nothing listens either: no port, no anchor, no host, no key.
    assert list((fake.root / "ports").iterdir()) == [] and list((fake.root / "hosts").iterdir()) == []
    assert daemon.state.ports == [] and daemon.reconciler is not None and daemon.reconciler.owned == {}
    for dashboard in (False, True):
        lines = render(daemon.state, dashboard=dashboard).splitlines()
        assert lines[0].startswith("!! storagetm.auth is not valid: invalid DH-HMAC-CHAP secret")
        assert any(line.startswith("!! storagetm.mode='read_only' is not valid") for line in lines[:6])
        assert any("NOTHING IS EXPORTED: fix storagetm.auth" in line for line in lines[:8])
        assert all(len(line) <= 80 for line in lines)
        text = "\n".join(lines)
        assert "nvme connect" not in text and "READ AND WRITE" not in text and "No disks exported yet" not in text


def test_alerts_are_drawn_before_the_title() -> None:
    text = render(RunState(alerts=["storagetm.port='x' is not valid: … — using the default; fix the boot option"]))
    assert text.splitlines()[0].startswith("!! storagetm.port='x'")
    assert text.splitlines()[1].startswith("storagetm: target disk mode")


def test_a_credential_alone_turns_its_protection_on() -> None:
    """A secret or key handed over as a systemd credential is never ignored: without the
    matching option it turns authentication / the controller secret / TLS on."""
    def only(name: str) -> Callable[[str], str]:
        return lambda asked: "given" if asked == name else ""

    plain = Settings(all_disks=True)
    assert with_credentials(plain, only("")) == plain
    assert with_credentials(plain, only(CREDENTIAL_SECRET)).auth
    ctrl = with_credentials(plain, only(CREDENTIAL_CTRL_SECRET))
    assert ctrl.auth and ctrl.dhchap_ctrl_secret == "generate"
    assert with_credentials(plain, only(CREDENTIAL_KEY)).tls
