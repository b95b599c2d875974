"""Peak memory of a code block: resident set size sampled by a background thread.

``peak_mb`` = max RSS seen during the block, ``delta_mb`` = peak − RSS at entry (what the block added).
RSS comes from ``/proc/self/statm`` (Linux); elsewhere from ``resource.getrusage`` (the process's lifetime
peak, so ``delta_mb`` is then a lower bound). tracemalloc would miss torch's tensors (not Python objects).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")


def rss_mb() -> float:
    """Current resident set size in MiB (lifetime peak where /proc is missing)."""
    if _STATM.is_file():
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.peak_mb`` / ``mem.delta_mb``."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb
