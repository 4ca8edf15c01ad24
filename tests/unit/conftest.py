from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storagetm import control, state
from storagetm.initiator import record
from storagetm.reconcile import journal
from storagetm.system import log


@pytest.fixture
def logged() -> Iterator[list[log.Record]]:
    """What the code under test logged, every level, in order (nothing is written)."""
    with log.capture() as records:
        yield records


@pytest.fixture(autouse=True)
def _private_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No unit test writes the real /run/storagetm: the state file and the ownership record
    go to the test's own directory."""
    monkeypatch.setattr(state, "STATE_FILE", tmp_path / "run" / "state.json")
    monkeypatch.setattr(control, "CONTROL_SOCKET", str(tmp_path / "run" / "control"))
    monkeypatch.setattr(journal, "JOURNAL_FILE", tmp_path / "run" / "owned.jsonl")
    monkeypatch.setattr(record, "RECORD", tmp_path / "run" / "helper" / "connected.json")
    yield
