"""bench.compare's report: per-boot spread, goals checked in every run, README between markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import compare_report
from bench.compare_report import goals, per_boot, report, table


def run(started: str, ours: dict[str, float], theirs: dict[str, float], boots: int = 2,
        samples: dict[str, list[float]] | None = None) -> dict[str, Any]:  # fmt: skip
    results = {"storagetm": dict(ours), "systemd-storagetm": dict(theirs), "nbd": {}}
    meta = {"date": started[:10], "started": started, "machine": "2 cores, x86_64, QEMU 10.0.2",
            "boots": str(boots), "hotplugs": "2", "rounds": "1"}  # fmt: skip
    return {"meta": meta, "results": results, "samples": {"storagetm": samples or {}}}


def test_per_boot_takes_each_boots_own_median() -> None:
    assert per_boot([1.0, 3.0, 10.0, 20.0, 30.0, 40.0], 3) == [2.0, 15.0, 35.0]
    assert per_boot([5.0], 3) == [5.0]  # taken once, in the last boot
    assert per_boot([1.0, 2.0, 3.0, 4.0], 3) == [1.0, 2.0, 3.0, 4.0]  # not the same count per boot: as sampled


def test_table_shows_the_spread_over_boots() -> None:
    first = run("2026-12-03 09:34 UTC", {"hotplug_s": 0.2}, {"hotplug_s": 0.25},
                samples={"hotplug_s": [0.1, 0.3, 0.2, 0.4]})  # fmt: skip
    line = next(row for row in table(first).splitlines() if row.startswith("| hotplug"))
    assert line == "| hotplug → in discovery log (s) | 0.20 (0.20–0.30) | 0.25 | n/a | 0.80 | n/a |"
    assert "Run started 2026-12-03 09:34 UTC" in table(first)


def test_a_goal_is_met_only_when_every_run_meets_it() -> None:
    good = run("2026-12-03 09:34 UTC", {"hotplug_s": 0.1, "read_mib_s": 30.0}, {"hotplug_s": 0.2, "read_mib_s": 30.0})
    bad = run("2026-12-03 10:02 UTC", {"hotplug_s": 0.19, "read_mib_s": 29.0}, {"hotplug_s": 0.2, "read_mib_s": 30.0})
    rows = {line.split(" | ")[0]: line for line in goals([good, bad]).splitlines()}
    assert rows["| hotplug → in discovery log (s) ≤ 0.8×"].endswith("| 0.50 | 0.95 | no |")
    assert rows["| sequential read (MiB/s) ≥ 0.97×"].endswith("| 1.00 | 0.97 | no |")  # 0.967: below
    assert rows["| daemon CPU time after the copies (s) ≤ 3×"].endswith("| n/a | n/a | no |")  # not measured: not met
    assert "| 0.50 | 0.50 | yes |" in goals([good, good])


def test_report_puts_every_run_into_the_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare_report, "chart", lambda results, path: path.write_text("chart"))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{compare_report.MARKERS[0]}\nold table\n{compare_report.MARKERS[1]}\nafter\n")
    runs = [run("2026-12-03 09:34 UTC", {"hotplug_s": 0.1}, {"hotplug_s": 0.2}),
            run("2026-12-03 10:02 UTC", {"hotplug_s": 0.3}, {"hotplug_s": 0.2})]  # fmt: skip
    text = report(runs, tmp_path, readme)
    written = readme.read_text()
    assert "old table" not in written and written.startswith("before\n") and written.endswith("after\n")
    assert "**Run 1.** Run started 2026-12-03 09:34 UTC" in written
    assert "**Run 2.** Run started 2026-12-03 10:02 UTC" in written
    assert "| run 1 | run 2 | met in every run |" in written
    assert (tmp_path / "compare.md").read_text() == text


def test_baseline_table_sets_both_storagetms_against_the_same_anchor(tmp_path: Path) -> None:
    first = run("2026-12-03 14:00 UTC", {"daemon_cpu_s": 3.0, "read_ro_mib_s": 20.0}, {"daemon_cpu_s": 0.3})
    first["results"]["storagetm-baseline"] = {"daemon_cpu_s": 4.5}
    first["meta"]["baseline"] = "base.efi"
    text = compare_report.baseline_report([first], tmp_path)
    line = next(row for row in text.splitlines() if row.startswith("| daemon CPU"))
    assert line == "| daemon CPU time after the copies (s) | 3.00 | 4.50 | 0.30 | 10.00 | 15.00 | 0.67 |"
    assert "read-only" not in text  # the baseline has no figure for it: left out
    assert "storagetm of base.efi" in text
    assert (tmp_path / "baseline.md").read_text() == text
