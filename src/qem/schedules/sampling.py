"""Poisson inclusions of private rows (docs/theory.md §13): independent Bernoulli(q) draws from
the operating system's CSPRNG, or from a user-seeded generator under the reproducibility
switch."""

from __future__ import annotations

import math
import os

import numpy as np


def inclusion_mask(
    n: int, q: float, rng: np.random.Generator | None = None, rows: range | None = None
) -> np.ndarray:
    """Independent Bernoulli(q) inclusions of the n rows, or of ``rows`` only (one rank's
    shard, qem.distributed): from 64-bit words of the operating system's CSPRNG
    (``os.urandom``, one word per row drawn; P(include) = floor(q 2^64) / 2^64), or from
    ``rng`` when the user asked for reproducibility. A shard's seeded draws are the ones a
    draw over all n rows gives those rows: the generator jumps over the other rows (PCG64
    ``advance``; one 64-bit output per float64 uniform) and ends where a full draw would."""
    rows = range(n) if rows is None else rows
    if rng is not None:
        if rows == range(n):
            return rng.random(n) < q
        jumper = np.random.Generator(type(rng.bit_generator)())
        jumper.bit_generator.state = rng.bit_generator.state
        jumper.bit_generator.advance(rows.start)
        rng.bit_generator.advance(n)
        return jumper.random(len(rows)) < q
    if q >= 1.0:
        return np.ones(len(rows), dtype=bool)
    words = np.frombuffer(os.urandom(8 * len(rows)), dtype=np.uint64)
    return words < np.uint64(math.floor(q * 2.0**64))
