"""This process's resident memory (Linux /proc), per phase of a checkpoint save or load.

The kernel keeps the peak resident set (VmHWM) and lets a process reset it (writing 5 to
/proc/self/clear_refs), so the peak of each phase is exact, not sampled: no thread, no cost.
Where /proc is missing or read-only the figures are None and nothing is reported.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

GIB = 1024**3
_STATUS = "/proc/self/status"


def _status_kib(name: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss() -> int | None:
    """Resident bytes now."""
    return _status_kib("VmRSS")


def peak() -> int | None:
    """Peak resident bytes since the process started or the last `reset_peak()`."""
    return _status_kib("VmHWM")


def reset_peak() -> bool:
    """Start a new peak at the current resident size. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class Phases:
    """Peak resident bytes and seconds of each named phase, in order."""

    before: int | None = None  # resident bytes when the first phase started
    peaks: dict[str, int | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    exact: bool = True

    @contextmanager
    def phase(self, name: str):
        if self.before is None:
            self.before = rss()
        self.exact = reset_peak() and self.exact
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.peaks[name] = peak()

    @property
    def max_peak(self) -> int | None:
        values = [v for v in self.peaks.values() if v is not None]
        return max(values) if values else None

    def summary(self) -> str:
        """'peak host memory 15.0 GiB = 1.02x the 14.7 GiB before (state 14.8, write 15.0)'"""
        top = self.max_peak
        if top is None or not self.before or not self.exact:
            return ""
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.peaks.items() if v is not None)
        return (
            f"peak resident {top / GIB:.2f} GiB = {top / self.before:.2f}x the "
            f"{self.before / GIB:.2f} GiB before ({parts})"
        )
