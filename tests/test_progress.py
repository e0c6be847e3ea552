"""Progress lines a person can follow (issue 23): whole step counts on a terminal, elapsed time
and ETA in log files."""

from __future__ import annotations

import io

from sae.runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_bar_counts_whole_steps():
    stream = Terminal()
    progress = Progress(300, "", "step", stream=stream)
    progress.goto(1)
    progress.close()
    text = stream.getvalue()
    assert "1/300" in text and "1.00/300" not in text, text


def test_log_lines_carry_elapsed_time_and_eta():
    progress = Progress(300, "", "step", stream=io.StringIO(), enabled=True)
    progress.started -= 10.0  # ten seconds ago
    progress.goto(100)
    line = progress.timing()
    assert line.startswith("00:10 elapsed, ETA 00:2"), line  # 200 steps at 10 steps/s
