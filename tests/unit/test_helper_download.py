"""The helper runs with nothing but Python: the initiator side imports only the standard
library, and the one-file storagetm.pyz runs from anywhere."""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import CodeType

import pytest

from ci.build_helper import build
from storagetm.connection import ConnectionCode, encode

REPO = Path(__file__).resolve().parents[2]
CHECK = """
import sys
sys.path.insert(0, {repo!r})
import storagetm.cli, storagetm.initiator.commands, storagetm.initiator.copy, storagetm.security.tls
try:
    storagetm.cli.main(["decode", {code!r}])
except SystemExit:
    pass
outside = sorted(name for name in sys.modules
                 if name.split(".")[0] not in (*sys.stdlib_module_names, "storagetm", "__main__"))
print("OUTSIDE", outside)
"""


def test_the_initiator_side_imports_only_the_standard_library() -> None:
    code = encode(ConnectionCode(("192.0.2.1",), 4420))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", CHECK.format(repo=str(REPO), code=code)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    # -S: no site-packages at all, so pyudev, systemd or rtslib could not even be found.
    assert "OUTSIDE []" in result.stdout, result.stdout


def test_the_one_file_helper_runs_help_and_decodes_a_code(tmp_path: Path) -> None:
    pyz = build(tmp_path / "storagetm.pyz")
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    helped = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--help"], cwd=elsewhere, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert "storagetm copy DISK DEST" in helped.stdout
    target_side = subprocess.run([sys.executable, "-I", "-S", str(pyz), "status"], cwd=elsewhere, capture_output=True,
                                 text=True)  # fmt: skip
    assert (target_side.returncode, target_side.stdout) == (2, "")
    assert target_side.stderr == ("storagetm: 'status' is not a command of this helper (it runs targets, connect, "
                                  "copy, disconnect, decode); the target's commands run on the target\n")
    host = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
    code = ConnectionCode(("169.254.1.2", "fe80::1"), 4420, host)
    decoded = subprocess.run([sys.executable, "-I", "-S", str(pyz), "decode", encode(code).lower()], cwd=elsewhere,
                             capture_output=True, text=True, check=True)  # fmt: skip
    shown = json.loads(decoded.stdout)
    assert (shown["addresses"], shown["port"], shown["host_nqn"]) == (list(code.addresses), 4420, code.host_nqn)


def test_the_one_file_helper_is_the_same_bytes_every_build(tmp_path: Path) -> None:
    """The image is built bit-identical; the helper inside it too, bytecode included, whatever
    the hash seed of the Python that builds it."""
    assert build(tmp_path / "a.pyz").read_bytes() == build(tmp_path / "b.pyz").read_bytes()
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "ci/build_helper.py", str(tmp_path / f"seed{seed}.pyz")], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONHASHSEED=seed))  # fmt: skip
    assert (tmp_path / "seed1.pyz").read_bytes() == (tmp_path / "seed2.pyz").read_bytes()
    assert (tmp_path / "seed1.pyz").read_bytes() == (tmp_path / "a.pyz").read_bytes()


def test_the_helper_starts_from_its_bytecode_and_without_the_target_side(tmp_path: Path) -> None:
    pyz = build(tmp_path / "storagetm.pyz")
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
        sources = {n for n in names if n.endswith(".py") and n != "__main__.py"}
        assert sources and {n + "c" for n in sources} <= names
        pyc = archive.read("storagetm/initiator/copy.pyc")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(pyc[4:8], "little") == 0b01  # unchecked hash
    imported = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", str(pyz), "copy", "--help"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    assert "storagetm copy" in imported.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in imported.stderr.splitlines() if "|" in line}
    assert {"storagetm.initiator.copy", "storagetm.initiator.fabrics"} <= modules
    unneeded = {"storagetm.cli", "storagetm.state", "storagetm.connection", "storagetm.initiator.mdns", "logging"}
    assert not modules & unneeded
    script = f"import sys; sys.path.insert(0, {str(pyz)!r}); import storagetm.initiator.copy as c; print(c.__file__)"
    where = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, check=True)
    assert where.stdout.strip().endswith("storagetm.pyz/storagetm/initiator/copy.pyc")


def test_a_module_marshal_format_2_cannot_hold_goes_in_as_source(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real = marshal.dumps

    def no_code_of_text(value: CodeType, version: int = marshal.version) -> bytes:
        if value.co_filename == "storagetm/text.py":
            raise ValueError("unmarshallable object")
        return real(value, version)

    monkeypatch.setattr(marshal, "dumps", no_code_of_text)
    pyz = build(tmp_path / "storagetm.pyz")
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
    assert "storagetm/text.py" in names and "storagetm/text.pyc" not in names and "storagetm/errors.pyc" in names
    code = encode(ConnectionCode(("192.0.2.9",), 4420))
    decoded = subprocess.run([sys.executable, "-I", "-S", str(pyz), "decode", code], capture_output=True, text=True,
                             check=True)  # fmt: skip
    assert json.loads(decoded.stdout)["addresses"] == ["192.0.2.9"]


def test_the_helper_runs_from_source_on_a_python_its_bytecode_is_not_for(tmp_path: Path) -> None:
    built = build(tmp_path / "built.pyz")
    other = tmp_path / "other.pyz"
    with zipfile.ZipFile(built) as archive, other.open("wb") as out:
        out.write(built.read_bytes()[: archive.infolist()[0].header_offset])  # the #! line
        with zipfile.ZipFile(out, "w") as copy:
            for info in archive.infolist():
                data = archive.read(info)
                copy.writestr(info, b"\0\0\r\n" + data[4:] if info.filename.endswith(".pyc") else data)
    code = encode(ConnectionCode(("192.0.2.7",), 4420))
    decoded = subprocess.run([sys.executable, "-I", "-S", str(other), "decode", code], capture_output=True, text=True,
                             check=True)  # fmt: skip
    assert json.loads(decoded.stdout)["addresses"] == ["192.0.2.7"]
    failed = subprocess.run([sys.executable, "-I", "-S", str(other), "decode", "STM1-NOPE"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert failed.returncode == 2 and failed.stderr.startswith("storagetm: ") and len(failed.stderr.splitlines()) == 1


def test_pip_installs_a_storagetm_command() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'storagetm = "storagetm.cli:main"' in text
    assert 'requires-python = ">=3.11"' in text


def test_the_protocol_constants_are_one_set_for_the_target_and_the_helper() -> None:
    import ast
    import re

    from storagetm import model, protocol

    assert (model.DISCOVERY_TRSVCID, model.DISCOVERY_NQN, model.IO_TRSVCID) == (8009, protocol.DISCOVERY_NQN, 4420)
    assert not [node for node in ast.walk(ast.parse((REPO / "storagetm/protocol.py").read_text()))
                if isinstance(node, ast.ImportFrom) and node.module != "__future__"]  # fmt: skip
    for module in ("connection.py", "initiator/commands.py", "initiator/fabrics.py", "model.py"):
        source = (REPO / "storagetm" / module).read_text()
        assert not re.search(r'^[A-Z_]+ = (8009|"nqn\.2014-08\.org\.nvmexpress)', source, re.MULTILINE), module
