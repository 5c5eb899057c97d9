"""Progress lines a user can read: what is done, how fast, and how long is left."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Meter:
    """Rate and time left of work measured as a fraction done (0..1) and a count (tokens).

    The rate counts only this run's work, so a resumed run's first line is not flattered by
    what an earlier run did; the time left extrapolates this run's pace over the rest.
    """

    def __init__(self, fraction_done: float = 0.0, unit: str = "tok"):
        self.started = time.perf_counter()
        self.first_fraction = fraction_done
        self.unit = unit
        self.count = 0

    def left(self, fraction_done: float) -> str:
        """Time left at this run's pace so far ('…' before any progress)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        gained = fraction_done - self.first_fraction
        return "…" if gained <= 0 else duration(elapsed * (1 - fraction_done) / gained)

    def line(self, fraction_done: float, count: int) -> str:
        """``count`` more units are done and ``fraction_done`` of the whole work."""
        self.count += count
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        gained = fraction_done - self.first_fraction
        left = elapsed * (1 - fraction_done) / gained if gained > 0 else None
        eta = "…" if left is None else duration(left)
        return (
            f"{self.count / elapsed:,.0f} {self.unit}/s · {100 * fraction_done:.0f}% · {eta} left"
        )
