"""The connection code: every code decodes to what was encoded; a mistyped character or two
swapped neighbours are caught; the target shows it (screen, status --json) and hides it like
the secrets it holds."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storagetm import connection, state
from storagetm.cli import main
from storagetm.connection import ConnectionCode, decode, encode, for_state
from storagetm.console.screen import render
from storagetm.model import Listener
from storagetm.security.auth import AuthConfig
from storagetm.security.keys import HIDDEN
from storagetm.security.tls import TLSConfig
from storagetm.state import RunState
from storagetm.system.network import Address

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


def key_text(prefix: str, hash_id: int, key: bytes) -> str:
    return f"{prefix}:{hash_id:02d}:" + base64.b64encode(key + struct.pack("<I", zlib.crc32(key))).decode() + ":"




def keys_of(prefix: str, hash_ids: tuple[int, int], lengths: list[int]) -> st.SearchStrategy[str]:
    raw = st.sampled_from(lengths).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    return st.one_of(st.just(""), st.builds(lambda h, k: key_text(prefix, h, k), st.integers(*hash_ids), raw))


secrets = keys_of("DHHC-1", (0, 3), [32, 48, 64])
tls_keys = keys_of("NVMeTLSkey-1", (1, 2), [32, 48])
host_nqns = st.one_of(st.just(""), st.uuids().map(lambda u: f"nqn.2014-08.org.nvmexpress:uuid:{u}"),
                      st.text(max_size=60).filter(lambda t: len(t.encode()) <= 223))  # fmt: skip
codes = st.builds(ConnectionCode, st.lists(st.ip_addresses().map(str), min_size=1, max_size=6).map(tuple),
                  st.integers(1, 65535), host_nqns, secrets, secrets, tls_keys)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(codes)
def test_every_code_decodes_to_what_was_encoded(code: ConnectionCode) -> None:
    text = encode(code)
    assert text.startswith("STM1-")
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567-1")  # QR alphanumeric mode carries these
    assert decode(text) == code
    assert decode(text.lower().replace("-", " ")) == code  # as typed: lower case, spaces


def full_code() -> ConnectionCode:
    return ConnectionCode(("169.254.12.34", "fe80::5054:ff:fe00:1"), 4420, HOST,
                          key_text("DHHC-1", 0, bytes(range(32))), key_text("DHHC-1", 1, bytes(range(1, 33))),
                          key_text("NVMeTLSkey-1", 1, bytes(range(2, 34))))  # fmt: skip


def test_a_host_nqn_of_the_uuid_form_takes_16_bytes() -> None:
    short = encode(ConnectionCode(("192.0.2.1",), 4420, HOST))
    long = encode(ConnectionCode(("192.0.2.1",), 4420, HOST.replace("uuid:", "uuid:x")))
    assert len(long.replace("-", "")) - len(short.replace("-", "")) > 30


def test_every_mistyped_character_is_caught() -> None:
    code = full_code()
    text = encode(code)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    checked = 0
    for i, char in enumerate(text):
        if i < 5 or char == "-":
            continue
        for other in alphabet.replace(char, ""):
            typo = text[:i] + other + text[i + 1 :]
            try:
                decoded = decode(typo)
            except ValueError as exc:
                assert str(exc).startswith("connection code: ")
                checked += 1
                continue
            # Only the unused low bits of the last character: the same bytes, the same code.
            assert decoded == code and i == len(text) - 1, (i, other)
    assert checked > 200 * 30


def test_swapped_neighbours_are_caught() -> None:
    text = encode(full_code())
    for i in range(5, len(text) - 1):
        if "-" in text[i : i + 2] or text[i] == text[i + 1]:
            continue
        with pytest.raises(ValueError, match="checksum wrong — a character was mistyped"):
            decode(text[:i] + text[i + 1] + text[i] + text[i + 2 :])


@pytest.mark.parametrize(("text", "why"), [
    ("", "does not start with STM1-"),
    ("hello", "does not start with STM1-"),
    ("STM1-AB!CD", "characters a code never has"),
    ("STM1-AEAAC", "too short"),
])  # fmt: skip
def test_bad_text_is_one_clear_line(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        decode(text)
    assert "\n" not in str(info.value)


def test_a_newer_version_says_update() -> None:
    payload = bytes([2, 0])
    payload += struct.pack(">I", zlib.crc32(payload))
    text = "STM1-" + base64.b32encode(payload).decode().rstrip("=")
    with pytest.raises(ValueError, match="version 2 is not known to this helper"):
        decode(text)


def test_lookalike_digits_read_as_the_letters_they_stand_for() -> None:
    code = ConnectionCode(("192.0.2.1",), 4420)
    text = encode(code)
    assert "O" in text or "I" in text or "B" in text
    assert decode(text[:5] + text[5:].replace("O", "0").replace("I", "1").replace("B", "8")) == code


def secret_state() -> RunState:
    return RunState(
        pid=os.getpid(),
        ports=[Listener("ipv6", "::", 4420), Listener("ipv6", "::", 8009)],
        auth=AuthConfig(full_code().secret, full_code().ctrl_secret, (HOST,)),
        tls=TLSConfig(full_code().tls_key, (HOST,)),
        addresses=[Address("ipv4", "169.254.12.34", "eth0", True),
                   Address("ipv6", "fe80::5054:ff:fe00:1", "eth0", True)],  # fmt: skip
    )


def test_the_code_of_a_running_target_holds_its_addresses_port_host_and_secrets() -> None:
    assert for_state(secret_state()) == full_code()


def test_the_screen_shows_the_code_only_where_the_secrets_are_shown() -> None:
    shown = render(secret_state())
    code = encode(full_code())
    assert code in "".join(line.strip() for line in shown.splitlines())
    assert all(len(line) <= 80 for line in shown.splitlines() if "STM1" in line or line.startswith("  STM"))
    hidden = render(secret_state().without_secrets())
    assert "STM1" not in hidden


def test_status_json_hides_a_code_with_secrets_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state.save(secret_state())
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["connection_code"] == HIDDEN
    assert main(["status", "--json", "--show-secrets"]) == 0
    assert decode(json.loads(capsys.readouterr().out)["connection_code"]) == full_code()


def test_status_json_shows_a_code_without_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    open_target = RunState(pid=os.getpid(), ports=[Listener("ipv6", "::", 4420)],
                           addresses=[Address("ipv4", "192.0.2.5", "eth0", False)])  # fmt: skip
    state.save(open_target)
    assert main(["status", "--json"]) == 0
    assert decode(json.loads(capsys.readouterr().out)["connection_code"]) == ConnectionCode(("192.0.2.5",), 4420)


def test_no_address_no_code() -> None:
    assert connection.code_text(RunState(pid=1)) == ""
    assert connection.screen_lines(RunState(pid=1)) == []


def test_the_dashboard_shows_the_code_when_it_fits_and_still_fits_when_it_does_not() -> None:
    open_target = RunState(pid=1, ports=[Listener("ipv6", "::", 4420)],
                           addresses=[Address("ipv4", "192.0.2.5", "eth0", False)])  # fmt: skip
    assert encode(for_state(open_target)) in render(open_target, dashboard=True)
    code = encode(full_code())
    crowded = render(secret_state(), dashboard=True, rows=25)
    assert code[:20] not in crowded and crowded == render(secret_state(), dashboard=True, code=False)
    assert code[:20] in render(secret_state(), dashboard=True, rows=60)


def test_pip_install_packages_the_helper() -> None:
    """pip/pipx build from pyproject.toml: the helper's subpackage is among the packages."""
    import tomllib

    import setuptools  # type: ignore[import-untyped]

    config = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    found = setuptools.find_packages(str(Path(__file__).resolve().parents[2]),
                                     include=config["tool"]["setuptools"]["packages"]["find"]["include"])  # fmt: skip
    assert "storagetm.initiator" in found and "storagetm" in found
    assert config["project"]["scripts"]["storagetm"] == "storagetm.cli:main"
