"""TLS: the PSK format, and what the exporter does with it (ports, keys, roll-back)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from storagetm import tls
from storagetm.configfs import Root
from storagetm.errors import UsageError
from storagetm.exports import DISCOVERY_NQN, Exporter, listeners
from storagetm.settings import Settings, apply_kernel_cmdline
from tests.unit.fake_configfs import FakeConfigfs
from tests.unit.test_exports import export_of, file_disk

HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
NVME_CLI_KEY = "NVMeTLSkey-1:01:YJGms0ICBKqLlhlb0AjrX6v7lKNOBNkIr1uz8Gi0sF9Ie3KZ:"  # from `nvme gen-tls-key`


def test_generated_keys_have_nvme_clis_format() -> None:
    assert tls.check_key(NVME_CLI_KEY) == NVME_CLI_KEY
    key = tls.generate_key()
    assert tls.check_key(key) == key and key != tls.generate_key()
    with pytest.raises(UsageError, match="checksum"):
        tls.check_key(NVME_CLI_KEY.replace("YJG", "YJH"))
    with pytest.raises(UsageError):
        tls.check_key("DHHC-1:00:abc:")


def test_kernel_option() -> None:
    settings, problems = apply_kernel_cmdline(Settings(), f"storagetm.tls={NVME_CLI_KEY}")
    assert settings.tls and settings.tls_key == NVME_CLI_KEY and problems == []
    settings, problems = apply_kernel_cmdline(Settings(), "storagetm.tls=maybe")
    assert not settings.tls and "storagetm.tls" in problems[0]


def test_resolve_keeps_the_previous_key_and_host() -> None:
    first = tls.resolve(True, "", (), None)
    assert first.enabled and first.hosts[0].startswith("nqn.2014-08.org.nvmexpress:uuid:")
    assert tls.resolve(True, "", (), first) == first
    assert tls.resolve(False, "", (), first) == tls.TLSConfig()
    assert tls.resolve(True, NVME_CLI_KEY, (HOST,), first) == tls.TLSConfig(NVME_CLI_KEY, (HOST,))


def tls_exporter(fake: FakeConfigfs, inserted: list[tuple[str, str, str]]) -> Exporter:
    exporter = Exporter(Root(fake.root, fake), insert_tls_key=lambda *key: inserted.append(key))
    exporter.setup_tls(tls.TLSConfig(NVME_CLI_KEY, (HOST,)))
    exporter.open_ports(listeners(4420, ipv6=True))
    return exporter


def test_ports_require_tls_and_each_subsystem_gets_its_key(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    inserted: list[tuple[str, str, str]] = []
    exporter = tls_exporter(fake, inserted)
    for port in ("4420", "8009"):
        assert (fake.root / "ports" / port / "addr_tsas").read_text().strip() == "tls1.3"
    export = export_of(file_disk(tmp_path, "a"))
    assert exporter.apply({export.nqn: export}) == []
    assert inserted == [(HOST, DISCOVERY_NQN, NVME_CLI_KEY), (HOST, export.nqn, NVME_CLI_KEY)]


def test_a_key_that_cannot_be_inserted_leaves_nothing_exported(tmp_path: Path) -> None:
    fake = FakeConfigfs(tmp_path / "configfs")
    exporter = tls_exporter(fake, [])

    def refuse(*_: str) -> None:
        raise tls.TLSError("cannot put the TLS key into the kernel keyring")

    exporter.insert_tls_key = refuse
    export = export_of(file_disk(tmp_path, "a"))
    errors = exporter.apply({export.nqn: export})
    assert len(errors) == 1 and "keyring" in errors[0].message
    assert list((fake.root / "subsystems").iterdir()) == []


def test_insert_key_reports_nvme_cli_failure_in_one_line() -> None:
    def failing(argv: list[str]) -> subprocess.CompletedProcess[str]:
        assert argv[:3] == ["nvme", "check-tls-key", "--insert"]
        return subprocess.CompletedProcess(argv, 1, "", "Failed to insert key: No such file or directory\n")

    with pytest.raises(tls.TLSError) as caught:
        tls.insert_key(HOST, DISCOVERY_NQN, NVME_CLI_KEY, run=failing)
    assert "\n" not in caught.value.one_line() and "No such file" in caught.value.one_line()
