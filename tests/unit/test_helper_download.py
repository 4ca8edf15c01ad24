"""The helper runs with nothing but Python: the initiator side imports only the standard
library, and the one-file storagetm.pyz runs from anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    host = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
    code = ConnectionCode(("169.254.1.2", "fe80::1"), 4420, host)
    decoded = subprocess.run([sys.executable, "-I", "-S", str(pyz), "decode", encode(code).lower()], cwd=elsewhere,
                             capture_output=True, text=True, check=True)  # fmt: skip
    shown = json.loads(decoded.stdout)
    assert (shown["addresses"], shown["port"], shown["host_nqn"]) == (list(code.addresses), 4420, code.host_nqn)


def test_the_one_file_helper_is_the_same_bytes_every_build(tmp_path: Path) -> None:
    """The image is built bit-identical; the helper inside it too."""
    assert build(tmp_path / "a.pyz").read_bytes() == build(tmp_path / "b.pyz").read_bytes()


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
