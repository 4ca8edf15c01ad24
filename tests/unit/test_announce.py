"""The mDNS announcement: the .dnssd file systemd-resolved publishes, and the host name."""

from __future__ import annotations

from pathlib import Path

import pytest

from storagetm.system import announce
from storagetm.system.announce import Announcer, recognisable_hostname


class Fake:
    def __init__(self, tmp_path: Path, hostname: str) -> None:
        self.hostname = hostname
        self.restarts = 0
        resolved = tmp_path / "systemd-resolved"
        resolved.touch()
        self.announcer = Announcer(tmp_path / "dnssd", resolved, self.restart, lambda: self.hostname,
                                   self.set_hostname)  # fmt: skip

    def restart(self) -> None:
        self.restarts += 1

    def set_hostname(self, name: str) -> None:
        self.hostname = name


def test_publish_names_the_machine_and_writes_the_service(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "storagetm")
    assert fake.announcer.publish("af1e62d2a429") == "storagetm-af1e62d2a429.local"
    assert fake.hostname == recognisable_hostname("af1e62d2a429")
    text = (tmp_path / "dnssd" / "storagetm-discovery.dnssd").read_text()
    assert "Type=_nvme-disc._tcp\n" in text and "Port=8009\n" in text
    assert "TxtText=p=tcp NQN=nqn.2014-08.org.nvmexpress.discovery\n" in text
    assert fake.restarts == 1
    fake.announcer.publish("af1e62d2a429")  # unchanged: resolved is left alone
    assert fake.restarts == 1
    fake.announcer.withdraw()
    assert not (tmp_path / "dnssd" / "storagetm-discovery.dnssd").exists() and fake.restarts == 2


def test_a_name_the_operator_gave_is_kept(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "lab-laptop-7")
    assert fake.announcer.publish("af1e62d2a429") == "lab-laptop-7.local"
    assert fake.hostname == "lab-laptop-7"


def test_without_resolved_nothing_is_announced(tmp_path: Path) -> None:
    announcer = Announcer(tmp_path / "dnssd", tmp_path / "no-systemd-resolved", lambda: None, lambda: "storagetm",
                          lambda name: None)  # fmt: skip
    assert announcer.publish("x") == ""
    assert not (tmp_path / "dnssd").exists()


def test_resolved_is_restarted_only_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(announce, "_systemctl", lambda *args: calls.append(args))
    running = tmp_path / "invocation:systemd-resolved.service"
    announce.restart_resolved_if_running(running)  # not started yet: it reads the file when it starts
    assert calls == []
    running.symlink_to("0123456789abcdef0123456789abcdef")  # systemd's link names the invocation id
    announce.restart_resolved_if_running(running)
    assert calls == [("try-restart", "--no-block", "systemd-resolved")]
