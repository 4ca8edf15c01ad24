"""The suite's reading of the target's screen: the rows a terminal shows after the
dashboard's partial redraws."""

from __future__ import annotations

from testbed.terminal import screen

CLEAR = "\x1b[H\x1b[2J"


def test_a_row_not_redrawn_stays_and_continues_the_new_line() -> None:
    first = CLEAR + "".join(f"{row}\x1b[K\r\n" for row in ["cmd -a fe80::1 ", "--hostnqn=H", "end"])
    # The next draw moves the fe80 line down; its continuation row is the same text, so not drawn.
    redraw = "\x1b[1;1Hcmd -a 169.254.1.1 \x1b[K\x1b[3;1Hcmd -a fe80::1 \x1b[K\x1b[4;1H--hostnqn=H\x1b[K\x1b[5;1H\x1b[J"
    rows = screen(first + redraw)
    assert rows == ["cmd -a 169.254.1.1 ", "--hostnqn=H", "cmd -a fe80::1 ", "--hostnqn=H"]
    assert "cmd -a 169.254.1.1 --hostnqn=H" in "".join(rows)


def test_colours_and_kernel_lines_before_the_first_clear() -> None:
    stream = "[   1.0] booting\r\n" + CLEAR + "\x1b[1;31mwarning\x1b[0m\x1b[K\r\nok\x1b[K\r\n"
    assert screen(stream) == ["warning", "ok"]
