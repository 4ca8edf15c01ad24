"""bench.compare's report: per-run tables with each figure's spread over the boots, the goals
checked in every run, the chart, and README's performance section.

A run is the JSON bench.compare writes (`meta`, `results` of medians, every `samples` list);
the report always shows the latest runs side by side, never only the better one."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

EXPORT_COUNTS = (1, 8, 32)
NAMES = ("storagetm", "systemd-storagetm", "nbd")
ROWS = (
    ("boot → disk offered (s)", "ready_s"),
    ("hotplug → in discovery log (s)", "hotplug_s"),
    ("sequential read (MiB/s)", "read_mib_s"),
    ("sequential write (MiB/s)", "write_mib_s"),
    ("sequential read, read-only mode (MiB/s)", "read_ro_mib_s"),
    ("sequential read, snapshot mode (MiB/s)", "read_snapshot_mib_s"),
    ("daemon CPU time after the copies (s)", "daemon_cpu_s"),
    ("daemon resident memory (MiB)", "daemon_rss_mib"),
    *((f"export {n} disk{'s' if n > 1 else ''} (s)", f"export_{n}_s") for n in EXPORT_COUNTS),
    *((f"export {n} disk{'s' if n > 1 else ''}, handed to the service (s)", f"handover_{n}_s")
      for n in EXPORT_COUNTS),
)
# Read-only and snapshot reads are compared with the anchors' plain read: they have no such modes.
# A hand-over is compared with the anchors' export by hand: they have no service to hand files to.
ANCHOR_KEY = {"read_ro_mib_s": "read_mib_s", "read_snapshot_mib_s": "read_mib_s",
              **{f"handover_{n}_s": f"export_{n}_s" for n in EXPORT_COUNTS}}  # fmt: skip
# The goals storagetm ÷ systemd-storagetm must meet in every run: (key, bound, at most?)
GOALS = (
    ("hotplug_s", 0.8, True),
    ("ready_s", 0.95, True),
    ("read_mib_s", 0.97, False),
    ("write_mib_s", 0.97, False),
    ("daemon_rss_mib", 2.0, True),
    ("daemon_cpu_s", 3.0, True),
    *((f"handover_{n}_s", 1.5, True) for n in EXPORT_COUNTS),
)
MARKERS = ("<!-- bench.compare: begin -->", "<!-- bench.compare: end -->")
Results = dict[str, dict[str, float | None]]


def ratio(results: Results, key: str, anchor: str, ours: str = "storagetm") -> float | None:
    mine, theirs = results[ours].get(key), results[anchor].get(ANCHOR_KEY.get(key, key))
    return mine / theirs if mine is not None and theirs else None


def per_boot(values: list[float], boots: int) -> list[float]:
    """Each boot's median of a figure sampled the same number of times in every boot; a figure
    taken once (in the last boot) has one value."""
    if boots < 2 or len(values) < boots or len(values) % boots:
        return values
    size = len(values) // boots
    return [statistics.median(values[i : i + size]) for i in range(0, len(values), size)]


def cell(value: float | None, spread: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    if spread and len(spread) > 1:
        return f"{value:.2f} ({min(spread):.2f}–{max(spread):.2f})"
    return f"{value:.2f}"


def title(run: dict[str, Any]) -> str:
    meta = run["meta"]
    return (f"Run started {meta['started']} on {meta['machine']} (QEMU TCG, one vCPU per VM): each figure is the "
            f"median over {meta['boots']} boots per implementation, taken in turns ({meta['hotplugs']} "
            f"hotplugs and {meta['rounds']} copies per boot), in brackets the lowest and highest boot's "
            "own median; export times are taken once, in the last boot.")  # fmt: skip


def table(run: dict[str, Any]) -> str:
    results: Results = run["results"]
    boots = int(run["meta"]["boots"])
    samples: dict[str, dict[str, list[float]]] = run.get("samples", {})
    lines = [
        title(run),
        "",
        "| | storagetm | systemd-storagetm | NBD | ÷ systemd-storagetm | ÷ NBD |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in ROWS:
        values = [cell(results[name].get(key), per_boot(samples.get(name, {}).get(key, []), boots)) for name in NAMES]
        anchors = [cell(ratio(results, key, anchor)) for anchor in NAMES[1:]]
        lines.append(f"| {label} | " + " | ".join([*values, *anchors]) + " |")
    return "\n".join(lines) + "\n"


BASELINE_NAMES = ("storagetm", "storagetm-baseline", "systemd-storagetm")


def baseline_table(run: dict[str, Any]) -> str:
    """A --baseline run: this storagetm and the baseline image's, each ÷ systemd-storagetm, and
    this one ÷ the baseline; figures only storagetm measures (modes, hand-over) are left out."""
    results: Results = run["results"]
    boots = int(run["meta"]["boots"])
    samples: dict[str, dict[str, list[float]]] = run.get("samples", {})
    lines = [
        title(run) + f" Baseline: storagetm of {run['meta'].get('baseline', 'another image')}.",
        "",
        "| | storagetm | baseline | systemd-storagetm | storagetm ÷ systemd-storagetm "
        "| baseline ÷ systemd-storagetm | storagetm ÷ baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in ROWS:
        if results["storagetm-baseline"].get(key) is None:
            continue
        values = [cell(results[name].get(key), per_boot(samples.get(name, {}).get(key, []), boots))
                  for name in BASELINE_NAMES]  # fmt: skip
        ratios = [ratio(results, key, "systemd-storagetm"),
                  ratio(results, key, "systemd-storagetm", ours="storagetm-baseline"),
                  ratio(results, key, "storagetm-baseline")]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join([*values, *(cell(r) for r in ratios)]) + " |")
    return "\n".join(lines) + "\n"


def baseline_report(runs: list[dict[str, Any]], results_dir: Path) -> str:
    """baseline.md from the latest --baseline runs (oldest first); README is not touched."""
    text = "\n".join(f"**Run {i + 1}.** " + baseline_table(run) for i, run in enumerate(runs))
    (results_dir / "baseline.md").write_text(text)
    return text


def goals(runs: list[dict[str, Any]]) -> str:
    """Each goal against systemd-storagetm, its ratio in every run, and whether every run met it."""
    labels = dict((key, label) for label, key in ROWS)
    head = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines = [f"| goal (storagetm ÷ systemd-storagetm) | {head} | met in every run |",
             "|---|" + "---|" * len(runs) + "---|"]  # fmt: skip
    for key, bound, at_most in GOALS:
        values = [ratio(run["results"], key, "systemd-storagetm") for run in runs]
        met = all(v is not None and (v <= bound if at_most else v >= bound) for v in values)
        lines.append(f"| {labels[key]} {'≤' if at_most else '≥'} {bound:g}× | "
                     + " | ".join(cell(v) for v in values) + f" | {'yes' if met else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: Results, path: Path) -> None:
    """Ratios storagetm ÷ each anchor as pairs of bars, drawn by ImageMagick; the line marks 1."""
    bar, scale, left = 14, 150, 260
    height = 70 + 2 * bar * len(ROWS) + 6 * len(ROWS)
    draw: dict[str, list[str]] = {"steelblue": [], "darkorange": []}
    labels = [f"line {left + scale},50 {left + scale},{height - 10}"]
    for i, (label, key) in enumerate(ROWS):
        y = 55 + i * (2 * bar + 6)
        labels.append(f"text 10,{y + bar + 4} '{label}'")
        for j, (anchor, colour) in enumerate((("systemd-storagetm", "steelblue"), ("nbd", "darkorange"))):
            value = ratio(results, key, anchor)
            if value is None:
                continue
            top = y + j * bar
            length = min(value, 3.0) * scale
            draw[colour].append(f"rectangle {left},{top} {left + length:.0f},{top + bar - 2}")
            labels.append(f"text {left + length + 6:.0f},{top + bar - 3} '{value:.2f}'")
    heading = "storagetm ÷ systemd-storagetm (blue) and ÷ NBD (orange); 1 = same (bench.compare)"
    command = ["convert", "-size", f"{left + 3 * scale + 80}x{height}", "xc:white", "-font", "DejaVu-Sans",
               "-pointsize", "12", "-fill", "black", "-draw", f"text 10,20 '{heading}'"]  # fmt: skip
    for colour, shapes in draw.items():
        if shapes:
            command += ["-fill", colour, "-stroke", "none", "-draw", " ".join(shapes)]
    command += ["-fill", "black", "-draw", " ".join(labels), str(path)]
    subprocess.run(command, check=True)


def update_readme(text: str, readme: Path) -> None:
    """Put the report between the markers in README's performance section."""
    old = readme.read_text()
    begin, end = old.find(MARKERS[0]), old.find(MARKERS[1])
    if begin < 0 or end < begin:
        return
    readme.write_text(old[: begin + len(MARKERS[0])] + "\n" + text + old[end:])


def report(runs: list[dict[str, Any]], results_dir: Path, readme: Path) -> str:
    """compare.md, the latest run's compare.png, and README's section, from the runs' JSON
    (oldest first)."""
    parts = [f"**Run {i + 1}.** " + table(run) for i, run in enumerate(runs)]
    text = "\n".join(parts) + "\n" + goals(runs)
    (results_dir / "compare.md").write_text(text)
    chart(runs[-1]["results"], results_dir / "compare.png")
    update_readme(text, readme)
    return text
