"""Byte accounting for a download job: done, total, rate, ETA."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class ProgressMeter:
    """Whole-job progress from per-file byte counts, with a rate over a sliding window."""

    def __init__(
        self, total: int, *, window_s: float = 3.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.current_file: str | None = None
        self._files: dict[str, int] = {}
        self._clock = clock
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self._moved = 0  #: bytes moved by this job (resumed bytes don't count toward the rate)

    @property
    def done(self) -> int:
        return sum(self._files.values())

    def update(self, path: str, on_disk: int) -> int:
        """Record a file's bytes on disk; returns how many are new since the last update."""
        before = self._files.get(path)
        self._files[path] = on_disk
        self.current_file = path
        moved = 0 if before is None else max(0, on_disk - before)
        self._moved += moved
        return moved

    def finish(self, path: str, size: int | None) -> None:
        if size is not None:
            self._files[path] = size

    def rate_bps(self) -> float:
        now = self._clock()
        self._samples.append((now, self._moved))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (self._moved - b0) / (now - t0) if now > t0 else 0.0

    def eta_s(self, rate_bps: float) -> float | None:
        rate = rate_bps
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        return round(left / rate, 1) if rate > 0 else None
