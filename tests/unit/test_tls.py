"""TLS: the PSK format, and what the nvmet fabric does with it (ports, keys, revocation, roll-back)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from storagetm.config.options import apply_kernel_cmdline
from storagetm.config.settings import Settings
from storagetm.errors import UsageError
from storagetm.model import DISCOVERY_NQN
from storagetm.security import tls
from tests.unit.fake_configfs import discovery_ports
from tests.unit.fake_machine import FakeKeyring
from tests.unit.test_exports import ADDRESS, ANCHOR, Target, export_of, file_disk

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


class RecordingKeyring(FakeKeyring):
    """The fake .nvme keyring, with what was added and revoked, in order."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.added: list[str] = []
        self.revoked: list[str] = []

    def add(self, description: str, payload: bytes) -> None:
        if self.refuse:
            raise OSError(126, "Required key not available")
        self.added.append(description)
        super().add(description, payload)

    def revoke(self, description: str) -> None:
        if description in self.keys:
            self.revoked.append(description)
        super().revoke(description)


def identity(subnqn: str) -> str:
    return tls.derive_psk(NVME_CLI_KEY, HOST, subnqn)[0]


TLS = tls.TLSConfig(NVME_CLI_KEY, (HOST,))


def test_ports_require_tls_and_each_subsystem_gets_its_key(tmp_path: Path) -> None:
    keyring = RecordingKeyring()
    target = Target(tmp_path, keyring=keyring)
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, tls=TLS, addresses=(ADDRESS,)) == []
    (discovery,) = discovery_ports(target.fake.root).values()
    for port in (target.fake.root / "ports" / "4420", discovery):
        assert (port / "addr_tsas").read_text().strip() == "tls1.3"
    referral = discovery / "referrals" / "storagetm"
    assert (referral / "addr_treq").read_text().strip() == "required"
    # The discovery subsystem's key first, then the export's, each before its subsystem is linked.
    assert keyring.added == [identity(DISCOVERY_NQN), identity(export.nqn)]
    assert keyring.keys[identity(export.nqn)] == tls.derive_psk(NVME_CLI_KEY, HOST, export.nqn)[1]
    assert identity(ANCHOR) not in keyring.keys  # nobody may use the anchor


def test_keys_are_revoked_when_tls_goes_off_and_at_teardown(tmp_path: Path) -> None:
    keyring = RecordingKeyring()
    target = Target(tmp_path, keyring=keyring)
    a, b = export_of(file_disk(tmp_path, "a")), export_of(file_disk(tmp_path, "b"))
    assert target.apply(a, b, tls=TLS, addresses=(ADDRESS,)) == []
    assert target.apply(a, tls=TLS, addresses=(ADDRESS,)) == []  # b withdrawn: its key goes with it
    assert keyring.revoked == [identity(b.nqn)]
    assert target.apply(a, addresses=(ADDRESS,)) == []  # TLS off: every key is revoked, the ports no longer ask for TLS
    assert keyring.keys == {} and sorted(keyring.revoked) == sorted(identity(n) for n in (DISCOVERY_NQN, a.nqn, b.nqn))
    (discovery,) = discovery_ports(target.fake.root).values()
    for port in (target.fake.root / "ports" / "4420", discovery):
        assert (port / "addr_tsas").read_text().strip() == ""
    assert target.names("ports", "4420", "subsystems") == sorted([a.nqn, ANCHOR])
    keyring.revoked.clear()
    assert target.apply(a, tls=TLS) == []
    assert sorted(keyring.keys) == sorted([identity(DISCOVERY_NQN), identity(a.nqn)])
    target.reconciler.teardown()
    assert keyring.keys == {} and sorted(keyring.revoked) == sorted([identity(DISCOVERY_NQN), identity(a.nqn)])


def test_keys_a_killed_instance_inserted_are_revoked_by_its_successor(tmp_path: Path) -> None:
    keyring = RecordingKeyring()
    target = Target(tmp_path, keyring=keyring)
    export = export_of(file_disk(tmp_path, "a"))
    assert target.apply(export, tls=TLS) == []
    target.restart()  # the first was killed: only the ownership record knows the keys
    assert target.apply(export) == []
    assert keyring.keys == {}


def test_a_key_that_cannot_be_inserted_leaves_nothing_exported(tmp_path: Path) -> None:
    target = Target(tmp_path, keyring=RecordingKeyring(refuse=True))
    export = export_of(file_disk(tmp_path, "a"))
    failures = target.apply(export, tls=TLS)
    assert failures and all("keyring" in f.message for f in failures)
    assert export.nqn in {f.group for f in failures}
    assert NVME_CLI_KEY not in " ".join(f.one_line() for f in failures)
    assert target.names("subsystems") == [ANCHOR]
    assert target.names("ports", "4420", "subsystems") == [ANCHOR]


# Made by nvme-cli 2.13 (`nvme check-tls-key --insert`) and read back from the keyring.
NVME_CLI_PSKS = [
    (NVME_CLI_KEY, DISCOVERY_NQN, "NVMe0R01",
     "a0718351c12aa82a8498a5989474631882f627211db92e7b2249329acb3dca03"),
    ("NVMeTLSkey-1:02:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vcSEgBQ==:",
     "nqn.2023-10.io.systemd:storagetm.0123456789ab.disk-s1", "NVMe0R02",
     "3e5027117b721f1095fb15c1f9dfb7a0ef33162e1f64b08ed2dfb972a2777419c540d8951dc1d26b1774e8a251ff5f14"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "subnqn", "version", "psk"), NVME_CLI_PSKS)
def test_psk_derived_as_nvme_cli_derives_it(key: str, subnqn: str, version: str, psk: str) -> None:
    assert tls.derive_psk(tls.check_key(key), HOST, subnqn) == (f"{version} {HOST} {subnqn}", bytes.fromhex(psk))


def test_key_length_must_match_its_hash() -> None:
    with pytest.raises(UsageError, match="01 keys have 32 bytes"):
        tls.check_key(NVME_CLI_PSKS[1][0].replace(":02:", ":01:"))


class FakeKeyutils:
    """libkeyutils as the kernel's .nvme keyring answers it; records what is asked."""

    def __init__(self, keyring: int = 0x2C0F009B, existing: int = 0, existing_description: str = "") -> None:
        self.keyring, self.existing, self.existing_description = keyring, existing, existing_description
        self.calls: list[tuple[object, ...]] = []

    def find_key_by_type_and_desc(self, key_type: bytes, description: bytes, destination: int) -> int:
        return self.keyring if (key_type, description) == (b"keyring", b".nvme") else -1

    def keyctl_link(self, key: int, keyring: int) -> int:
        self.calls.append(("link", key, keyring))
        return 0

    def keyctl_search(self, keyring: int, key_type: bytes, description: bytes, destination: int) -> int:
        return self.existing or -1

    def keyctl_describe(self, key: int, buffer: Any, length: int) -> int:
        text = f"psk;0;0;3f010000;{self.existing_description}".encode()
        buffer.value = text
        return len(text) + 1

    def keyctl_revoke(self, key: int) -> int:
        self.calls.append(("revoke", key))
        return 0

    def add_key(self, key_type: bytes, description: bytes, payload: bytes, length: int, keyring: int) -> int:
        self.calls.append(("add", key_type, description, payload, length, keyring))
        return 0x1234


def test_insert_key_puts_the_psk_into_the_keyring_and_runs_no_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PSK used to be an argument of `nvme check-tls-key`: readable in /proc/PID/cmdline."""

    def no_program(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a program was run")

    monkeypatch.setattr(subprocess, "Popen", no_program)
    identity, psk = tls.derive_psk(NVME_CLI_KEY, HOST, DISCOVERY_NQN)
    lib = FakeKeyutils(existing=0x77, existing_description=identity)
    tls.insert_key(HOST, DISCOVERY_NQN, NVME_CLI_KEY, tls.Keyring(library=lib))
    # Linked into the session keyring before anything is searched (once per look-up: harmless).
    assert lib.calls[0] == ("link", lib.keyring, tls.KEY_SPEC_SESSION_KEYRING)
    assert {c for c in lib.calls if c[0] == "link"} == {lib.calls[0]}
    assert [c for c in lib.calls if c[0] != "link"] == [("revoke", 0x77),
                                                       ("add", b"psk", identity.encode(), psk, 32, lib.keyring)]


def test_another_disks_key_whose_name_starts_alike_is_not_revoked() -> None:
    """The kernel's psk type matches a key whose description begins with the one searched
    for: the key of subsystem ...-n10 answers a search for ...-n1 and must stay."""
    identity, psk = tls.derive_psk(NVME_CLI_KEY, HOST, "nqn.2023-10.io.systemd:storagetm.x.disk1")
    lib = FakeKeyutils(existing=0x77, existing_description=identity + "0")
    tls.insert_key(HOST, "nqn.2023-10.io.systemd:storagetm.x.disk1", NVME_CLI_KEY, tls.Keyring(library=lib))
    assert ("revoke", 0x77) not in lib.calls
    assert lib.calls[-1] == ("add", b"psk", identity.encode(), psk, 32, lib.keyring)


def test_no_nvme_keyring_is_one_line_without_the_key() -> None:
    with pytest.raises(tls.TLSError) as caught:
        tls.insert_key(HOST, DISCOVERY_NQN, NVME_CLI_KEY, tls.Keyring(library=FakeKeyutils(keyring=-1)))
    line = caught.value.one_line()
    assert "\n" not in line and "the kernel has no .nvme keyring" in line and "CONFIG_NVME_KEYRING" in line
    assert NVME_CLI_KEY not in line
