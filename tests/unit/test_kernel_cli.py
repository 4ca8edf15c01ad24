from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from storagetm.cli import main, serve_parser
from storagetm.errors import ExitCode, KernelError
from storagetm.fabrics.nvmet import kernel


def test_missing_nvmet_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernel, "CONFIGFS", tmp_path)
    monkeypatch.setattr(kernel, "_is_mounted", lambda path: True)
    monkeypatch.setattr(kernel, "SYS_MODULE", tmp_path / "module")

    def modprobe(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", f"modprobe: FATAL: Module {argv[-1]} not found")

    monkeypatch.setattr(kernel, "_run", modprobe)
    with pytest.raises(KernelError) as info:
        kernel.ensure_nvmet()
    assert info.value.exit_code == ExitCode.KERNEL
    assert "cannot load kernel module nvmet" in info.value.one_line()
    assert "CONFIG_NVME_TARGET" in info.value.one_line()


def test_loaded_modules_are_not_modprobed_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """At boot modprobe@nvmet_tcp has loaded them: two modprobe runs would only cost start-up time."""
    monkeypatch.setattr(kernel, "CONFIGFS", tmp_path)
    monkeypatch.setattr(kernel, "_is_mounted", lambda path: True)
    monkeypatch.setattr(kernel, "SYS_MODULE", tmp_path / "module")
    for module in ("nvmet", "nvmet_tcp"):
        (tmp_path / "module" / module).mkdir(parents=True)
    (tmp_path / "nvmet").mkdir()
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(kernel, "_run", lambda *argv: ran.append(argv))
    assert kernel.ensure_nvmet() == tmp_path / "nvmet"
    assert ran == []


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:  # argparse: usage, then one error line, exit 2
        main(["--nqn", "bogus!", "--all"])
    assert info.value.code == ExitCode.USAGE
    assert "argument --nqn: invalid NQN prefix 'bogus!'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([]) == ExitCode.USAGE
    assert capsys.readouterr().err.strip() == (
        "storagetm: no disks selected (give --all, or name the disks (DEVICE|FILE …))"
    )


def test_status_when_not_running(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:  # fmt: skip
    from storagetm import state

    monkeypatch.setattr(state, "STATE_FILE", tmp_path / "state.json")
    assert main(["status"]) == ExitCode.NOT_RUNNING
    assert "storagetm is not running" in capsys.readouterr().err


def exit_codes_in(text: str) -> set[int]:
    """The codes of an 'exit codes: 0 ok, 1 failure, …' list."""
    return {int(code) for code in re.findall(r"(?:^|[,:])\s*(\d+) [a-z]", text)}


def test_documented_exit_codes_are_the_ones_used() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.search(r"^Exit codes: (.*?)\n\n", readme, re.MULTILINE | re.DOTALL)
    assert listed is not None
    epilog = str(serve_parser().epilog).split("exit codes:", 1)[1]
    assert exit_codes_in(listed.group(0)) == exit_codes_in(epilog) == {int(code) for code in ExitCode}
