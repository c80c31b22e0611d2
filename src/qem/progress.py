"""Progress bars: the one place qem builds them (tqdm), so that every long pass (curvature,
clip norm, private pass, rounds, pretraining, baselines, audits, sweeps) shows the same kind of
bar, and one rule decides when one is shown: when asked for and stderr is a terminal (a bar
written to a log file or a pipe is a stream of escape codes)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """Whether stderr, where the bars go, is a terminal."""
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    initial: int = 0,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), shown only when
    ``enabled`` and stderr is a terminal; ``leave=False`` bars vanish when done (the passes
    inside a round)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not (enabled and on_terminal()),
        leave=leave,
        initial=initial,
    )
