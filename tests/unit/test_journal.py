"""The ownership record: what a killed or starved instance leaves is still read right."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from storagetm.reconcile.journal import MADE, MAKING, Journal
from storagetm.reconcile.objects import make

SUB = make("nvmet-subsystem", "nqn.2024-01.com.example:a", {"model": "M"}, group="a")
HOST = make("nvmet-host", "nqn.2024-01.com.example:h", {"dhchap_key": "DHHC-1:00:c2VjcmV0:"}, secret=("dhchap_key",))


def test_replay_gives_what_the_records_add_up_to(tmp_path: Path) -> None:
    record = Journal(tmp_path / "owned.jsonl")
    record.making(SUB)
    record.made(SUB, {"x": "1"})
    record.making(HOST)
    replayed = Journal(tmp_path / "owned.jsonl").load()
    assert replayed[SUB.key].state == MADE and replayed[SUB.key].facts == {"x": "1"}
    assert replayed[HOST.key].state == MAKING
    assert "c2VjcmV0" not in (tmp_path / "owned.jsonl").read_text()  # the secret by its digest only


def test_a_short_write_fails_the_make_and_loses_no_later_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = Journal(tmp_path / "owned.jsonl")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:10]))
    with pytest.raises(OSError, match="No space left"):
        record.making(SUB)
    monkeypatch.setattr(os, "write", real_write)
    record.making(HOST)
    assert list(Journal(tmp_path / "owned.jsonl").load()) == [HOST.key]


def test_the_record_is_private_whatever_was_there(tmp_path: Path) -> None:
    path = tmp_path / "run" / "owned.jsonl"
    path.parent.mkdir(mode=0o755)
    path.write_text("")
    path.chmod(0o644)
    Journal(path).making(SUB)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
