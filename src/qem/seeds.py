"""Seeds, derived one way: numpy SeedSequence children of a user seed (the reproducibility
switch), or operating-system entropy when there is none. A seed is a diagnostic, never part of a
publishable report: anyone who knows it can subtract the noise."""

from __future__ import annotations

import secrets

import numpy as np

from qem.errors import InvalidParameterError


def check_seed(seed: object) -> int | None:
    """``seed`` as an int, None for operating-system entropy; an error otherwise."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidParameterError(f"seed must be None or an integer >= 0, got {seed!r}.")
    return int(seed)


def child_seeds(seed: int | None, count: int) -> list[int]:
    """``count`` independent 32-bit seeds: the first word of each of numpy's
    ``SeedSequence(seed).spawn(count)`` children, or 63 bits of OS entropy each without a
    seed."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(count)]
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(count)]


def derived_seed(seed: int, *entropy: int) -> int:
    """A 63-bit seed from ``SeedSequence([seed, *entropy])`` (e.g. a sweep's seed and a hash of
    a grid point: every point gets its own stream, the same on every rerun)."""
    state = np.random.SeedSequence([seed, *entropy]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class SeedTree:
    """Independent streams of one run from one user seed: ``noise[t]`` for round t's Normal
    draw and ``sampling`` for the Poisson inclusions (``child_seeds(seed, T + 1)``); all None
    (operating-system entropy, drawn where used) without a seed."""

    def __init__(self, seed: int | None, rounds: int) -> None:
        seed = check_seed(seed)
        if seed is None:
            self.noise: list[int | None] = [None] * rounds
            self.sampling: int | None = None
            return
        values = child_seeds(seed, rounds + 1)
        self.noise, self.sampling = values[:rounds], values[rounds]
