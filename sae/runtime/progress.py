"""Progress of a long loop: a tqdm bar on a terminal, plain lines in a log file.

tqdm's carriage returns would turn a SLURM log into one unreadable line, so when the stream is
not a terminal the bar prints whole lines instead: a meter every ``every_s`` seconds and at the
end, and any line the caller writes with :meth:`Progress.note`. Imports no torch.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

SCALE_FROM = 100_000  # totals from which the bar shows 1.2k / 1.3M rather than every digit


def clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``: tqdm's format of a duration."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


class Progress:
    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0,
                 enabled: bool = True, every_s: float | None = None, final_line: bool = True,
                 stream: TextIO | None = None) -> None:
        """``every_s``: seconds between plain meter lines (None: none); ``final_line``: a plain
        meter line at :meth:`close`."""
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.initial, self.every_s, self.final_line = initial, every_s, final_line
        self.started = self.last = time.perf_counter()
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            # Whole counts ("12/300"); SI prefixes only where the counts get long ("1.2M").
            self.bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit,
                            unit_scale=total >= SCALE_FROM, smoothing=0.05,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int) -> None:
        """Advance by ``n``."""
        self.goto(self.n + n)

    def goto(self, n: int, **postfix: object) -> None:
        """Set the position to ``n``; ``postfix`` shows beside the bar (terminal only)."""
        self.n = n
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                self.bar.set_postfix(postfix)
            self.bar.refresh()
        elif (self.enabled and self.every_s is not None
              and time.perf_counter() - self.last >= self.every_s):
            self._meter_line()

    def note(self, text: str) -> None:
        """A line for a log file (the bar shows its postfix instead on a terminal)."""
        if self.enabled and self.bar is None:
            print(text, file=self.stream, flush=True)

    def rate(self) -> float:
        """Units per second since the start (resumed units not counted)."""
        return (self.n - self.initial) / max(time.perf_counter() - self.started, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> float | None:
        """Seconds to the end at the rate so far (None before any unit)."""
        rate = self.rate()
        return (self.total - self.n) / rate if rate > 0 else None

    def timing(self) -> str:
        """``0:12 elapsed, ETA 1:03`` for a log line."""
        eta = self.eta()
        return f"{clock(self.elapsed())} elapsed" + (f", ETA {clock(eta)}" if eta is not None
                                                     else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.final_line:
            self._meter_line()

    def _meter_line(self) -> None:
        from tqdm import tqdm

        self.last = time.perf_counter()
        meter = tqdm.format_meter(self.n, self.total, self.last - self.started, prefix=self.desc,
                                  unit=self.unit, ncols=0)
        print(meter, file=self.stream, flush=True)
