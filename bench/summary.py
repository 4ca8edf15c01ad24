"""What every side-by-side bench writes: medians of its samples, and the JSON in bench/results."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def arguments(doc: str, rounds: int = 3) -> argparse.Namespace:
    """The options every one-boot bench takes: the disk size and the rounds per figure."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser.parse_args()


def summarise(size_mib: int, rounds: int, samples: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, Any]]:
    """The median of each figure's samples, and the result record that holds them all."""
    median = {name: statistics.median(values) for name, values in samples.items()}
    return median, {"date": time.strftime("%Y-%m-%d"), "size_mib": size_mib, "rounds": rounds, "mib_s": samples,
                    "median_mib_s": median}  # fmt: skip


def save(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))


def save_ratios(name: str, size_mib: int, rounds: int, samples: dict[str, list[float]], anchor: str) -> dict[str, Any]:
    """Medians, each figure's ratio to `anchor`'s (in the record as `ratio_to_<anchor>`),
    the JSON saved, and a table printed."""
    median, result = summarise(size_mib, rounds, samples)
    result[f"ratio_to_{anchor}"] = ratios = {figure: median[figure] / median[anchor] for figure in samples}
    save(name, result)
    print(f"| | median MiB/s | ratio to {anchor} |\n|---|---|---|")
    for figure in samples:
        print(f"| {figure} | {median[figure]:.1f} | {ratios[figure]:.2f} |")
    return result
