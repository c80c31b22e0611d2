"""Progress bars: the one place qem builds them (tqdm), so that every long pass (curvature,
clip norm, private pass, rounds, pretraining, baselines, audits) shows the same kind of bar and
the same rule decides when one is shown."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), hidden unless
    ``enabled``; ``leave=False`` bars vanish when done (the passes inside a round)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
