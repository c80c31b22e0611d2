"""Wall-clock seconds per named phase: the one timer of qem (round phases, baselines, the CLI,
benchmarks). Timings depend on the private data (a Poisson round's size, an invalid record), so
they are diagnostics for the person running qem, never part of a privacy report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Seconds summed per phase name, taken either as laps (``lap(name)``: the time since the
    previous lap or the start) or around a block (``with timer.phase(name):``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap (or the start) to ``name``."""
        now = time.perf_counter()
        self._add(name, now - self._last)
        self._last = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent in the block to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - start)
            self._last = time.perf_counter()

    @property
    def total(self) -> float:
        """Seconds over every phase."""
        return sum(self.seconds.values())
