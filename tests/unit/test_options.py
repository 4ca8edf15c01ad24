"""One table of options: the command line, the kernel command line, credentials, the help
and the README all come from storagetm.config.options.OPTIONS; and upstream's $SYSTEMD_NVME_*."""

from __future__ import annotations

from pathlib import Path

import pytest

from storagetm.backing.modes import Mode
from storagetm.cli import main, serve_parser, settings_from
from storagetm.config.options import OPTIONS, apply_kernel_cmdline, kernel_help, kernel_options, readme_with_table
from storagetm.config.settings import Settings
from storagetm.disks.disk import Disk
from storagetm.disks.identity import NvmeOverrides, nvme_overrides
from storagetm.disks.policy import SystemFacts
from storagetm.errors import ExitCode
from storagetm.security.auth import generate_secret
from storagetm.security.tls import generate_key
from storagetm.selection import plan
from storagetm.system import log

README = Path(__file__).resolve().parents[2] / "README.md"
BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
QUUX = "nqn.2023-10.io.systemd:quux"
UUID = "0b2a8c4e-7f5d-4d3a-9e21-6c1f0a9b8d77"
SDA = Disk(name="sda", devnode="/dev/sda", devnum=1, devtype="disk", size=1 << 30, serial="A", model="M")
SDB = Disk(name="sdb", devnode="/dev/sdb", devnum=2, devtype="disk", size=1 << 30, serial="B", model="M")


def test_the_readme_table_is_the_options_table() -> None:
    text = README.read_text()
    assert readme_with_table(text) == text, "run: python3 -m storagetm.config.options --update-readme README.md"


def test_every_boot_option_is_in_the_help_and_every_flag_in_the_parser() -> None:
    help_text = kernel_help()
    assert all(f"storagetm.{name}=" in help_text for name in kernel_options())
    usage = serve_parser().format_help()
    assert all(opt.flag in usage for opt in OPTIONS if opt.flag)


def test_help_kernel_cmdline_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help-kernel-cmdline"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "storagetm.realtime=1|0" in out and "storagetm.tls_key=@FILE" in out


def cli(*argv: str) -> Settings:
    return settings_from(serve_parser().parse_intermixed_args(list(argv)))[0]


def test_the_command_line_is_applied_in_order_and_intermixed(tmp_path: Path) -> None:
    image = tmp_path / "storagetm.test"
    image.write_bytes(b"\0" * 4096)
    settings = cli(str(image), f"--nqn={QUUX}", "--read-only", "--mode=rw")  # as TEST-84: the option after the file
    assert settings.devices == (str(image),) and settings.nqn_base == QUUX and settings.mode is Mode.READ_WRITE
    assert cli("sda", "--port=4421", "sdb").devices == ("sda", "sdb")
    assert cli("--mode=rw", "--snapshot").mode is Mode.SNAPSHOT
    twice = cli("-a", "--all")
    assert twice.all_disks and twice.lift_guards and not cli("-a").lift_guards


def test_a_plain_prefix_is_taken_after_the_file_as_upstream_does(tmp_path: Path) -> None:
    """Upstream's TEST-84 passes `FILE --nqn=quux`; a name that cannot be an NQN still is not."""
    (tmp_path / "storagetm.test").write_bytes(bytes(4096))
    assert serve_parser().parse_args([str(tmp_path / "storagetm.test"), "--nqn=quux"]).nqn == "quux"
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--nqn=qu ux"])


@pytest.mark.parametrize("word, field", [("storagetm.realtime=1", "realtime"), ("storagetm.announce=yes", "announce")])
def test_switches_have_a_boot_twin(word: str, field: str) -> None:
    settings, problems = apply_kernel_cmdline(Settings(), word)
    assert problems == [] and getattr(settings, field) is True
    settings, problems = apply_kernel_cmdline(Settings(realtime=True), "storagetm.realtime=0")
    assert problems == [] and not settings.realtime


def test_the_web_page_offers_downloads_with_tls_only_when_asked_and_a_bad_value_turns_it_off() -> None:
    assert Settings().web and not Settings().web_downloads
    settings, problems = apply_kernel_cmdline(Settings(), "storagetm.web=downloads")
    assert problems == [] and settings.web and settings.web_downloads
    settings, problems = apply_kernel_cmdline(Settings(), "storagetm.web=0")
    assert problems == [] and not settings.web
    settings, problems = apply_kernel_cmdline(Settings(), "storagetm.web=download")
    assert not settings.web and not settings.web_downloads
    assert problems == ["storagetm.web='download' is not valid: expects 1, 0 or downloads — not serving the web "
                        "page; fix the boot option"]  # fmt: skip
    assert settings_from(serve_parser().parse_args(["--web-downloads"]))[0].web_downloads
    assert not settings_from(serve_parser().parse_args(["--no-web"]))[0].web


def test_a_bad_realtime_keeps_the_default() -> None:
    settings, problems = apply_kernel_cmdline(Settings(realtime=True), "storagetm.realtime=maybe")
    assert settings.realtime and settings.refusals == ()
    assert problems == ["storagetm.realtime='maybe' is not valid: expects 1 or 0 — using the default; "
                        "fix the boot option"]  # fmt: skip


@pytest.mark.parametrize("name, value, field", [
    ("tls_key", generate_key(), "tls_key"), ("tls-key", generate_key(), "tls_key"),
    ("dhchap_secret", generate_secret(), "dhchap_secret"),
    ("dhchap-ctrl-secret", generate_secret(), "dhchap_ctrl_secret"),
])  # fmt: skip
def test_secret_boot_options_take_a_file_only(tmp_path: Path, name: str, value: str, field: str) -> None:
    (tmp_path / "secret").write_text(value + "\n")
    settings, problems = apply_kernel_cmdline(Settings(), f"storagetm.{name}=@{tmp_path / 'secret'}")
    assert problems == [] and getattr(settings, field) == value and (settings.auth or settings.tls)
    settings, problems = apply_kernel_cmdline(Settings(all_disks=True), f"storagetm.{name}={value}")
    assert settings.refusals == (f"storagetm.{name.replace('-', '_')}",)
    assert plan([SDA], settings, SystemFacts(), BASE).exports == {}
    (problem,) = problems
    assert "takes @FILE" in problem and value not in problem and problem.endswith("— exporting nothing; "
                                                                                  "fix the boot option")  # fmt: skip
    settings, problems = apply_kernel_cmdline(Settings(), f"storagetm.{name}=@{tmp_path / 'missing'}")
    assert settings.refusals and "cannot read" in problems[0]


def test_allowed_hosts_add_up() -> None:
    a = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
    b = "nqn.2014-08.org.nvmexpress:uuid:66666666-2222-3333-4444-555555555555"
    assert cli("--allow-host", a, f"--allow-host={b},{a}").allow_hosts == (a, b)


def test_environment_overrides_as_upstream() -> None:
    environ = {"SYSTEMD_NVME_MODEL": "Model X", "SYSTEMD_NVME_FIRMWARE": "1.2", "SYSTEMD_NVME_SERIAL": "S123",
               "SYSTEMD_NVME_UUID": UUID.upper()}  # fmt: skip
    overrides, warnings = nvme_overrides(environ)
    assert overrides == NvmeOverrides("Model X", "1.2", "S123", UUID) and warnings == []
    overrides, warnings = nvme_overrides({"SYSTEMD_NVME_UUID": "not-a-uuid"})
    assert overrides == NvmeOverrides() and warnings == ["$SYSTEMD_NVME_UUID='not-a-uuid' is not a UUID, ignoring"]
    assert nvme_overrides({"SYSTEMD_NVME_UUID": "00000000-0000-0000-0000-000000000000"})[0].uuid == ""


def test_one_named_disk_takes_every_override_several_share_model_and_firmware() -> None:
    overrides = NvmeOverrides("Model X", "1.2", "S123", UUID)
    one = plan([SDA, SDB], Settings(devices=("sda",), nvme=overrides), SystemFacts(), BASE)
    (identity,) = [export.identity for export in one.exports.values()]
    assert (identity.model, identity.firmware, identity.serial, identity.uuid) == ("Model X", "1.2", "S123", UUID)
    every = plan([SDA, SDB], Settings(all_disks=True, nvme=overrides), SystemFacts(), BASE)
    identities = [export.identity for export in every.exports.values()]
    assert {(i.model, i.firmware) for i in identities} == {("Model X", "1.2")}
    assert {i.serial for i in identities} == {"A", "B"} and len({i.uuid for i in identities}) == 2
    assert UUID not in {i.uuid for i in identities}


def test_serve_reads_the_environment(monkeypatch: pytest.MonkeyPatch, logged: list[log.Record]) -> None:
    monkeypatch.setenv("SYSTEMD_NVME_UUID", "bogus")
    monkeypatch.setenv("SYSTEMD_NVME_SERIAL", "S1")
    assert main(["sda", "sdb"]) in (ExitCode.USAGE, ExitCode.FAILURE, ExitCode.KERNEL)  # not root, or no nvmet
    messages = [r.message for r in logged]
    assert any("$SYSTEMD_NVME_UUID='bogus' is not a UUID" in m for m in messages)
    assert any("apply only to a single named disk" in m for m in messages)
