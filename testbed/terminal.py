"""What a terminal shows after a stream of output: the target's dashboard redraws only the
rows that changed, so the stream alone does not hold the screen (a row drawn once stays,
though it now continues another line)."""

from __future__ import annotations

import re

TOKEN = re.compile(r"\x1b\[([0-9;:?]*)([A-Za-z])|([^\x1b]+)|\x1b")


def screen(stream: str) -> list[str]:
    """The rows on the screen at the end of `stream`: cursor moves (CSI H), clears (2J, J,
    K), carriage returns and newlines applied; colours and other escapes ignored. No
    scrolling: a row past the bottom is simply the next row."""
    grid: dict[int, str] = {}
    row, col = 1, 0
    for match in TOKEN.finditer(stream):
        params, command, text = match.group(1), match.group(2), match.group(3)
        if text is not None:
            for char in text:
                if char == "\r":
                    col = 0
                elif char == "\n":
                    row += 1
                else:
                    line = grid.get(row, "").ljust(col)
                    grid[row] = line[:col] + char + line[col + 1 :]
                    col += 1
        elif command == "H":
            numbers = [int(n) if n else 1 for n in (params or "").split(";")] + [1, 1]
            row, col = numbers[0], numbers[1] - 1
        elif command == "J":
            if params == "2":
                grid.clear()
            else:
                grid = {r: (text_ if r < row else text_[:col]) for r, text_ in grid.items() if r <= row}
        elif command == "K":
            grid[row] = grid.get(row, "")[:col]
    return [grid.get(r, "") for r in range(1, max(grid, default=0) + 1)]
