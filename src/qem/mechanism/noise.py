"""Where the mechanism's standard normals come from, and the snapping of the release to a grid.

The proofs of docs/theory.md are about real-valued Normals; the sampler adds float64 Normals
to a float64 mean. docs/theory.md §10a says what that costs and what the secure mode buys:

* ``SeededNoise`` (PCG64 from a user seed: reproducible, predictable to whoever knows the seed),
  ``SystemNoise`` (PCG64 seeded from operating-system entropy, the default) and
  ``SecureNoise`` (every normal from the operating system's CSPRNG by an inverse CDF whose
  error is bounded, ``normals_from_uint64``) are the three ``NoiseSource``s.
* ``snap_to_grid`` rounds a draw to the integers t = rint((c + y) / Lambda) in whitened coordinates
  (c the whitened mean, y the noise), with every float rounding applied to data-independent
  values, on the public power-of-two grid ``snap_grid`` (Mironov 2012's snapping, for the
  Gaussian); ``float_tv_bound`` bounds how often t differs from the rounding of the ideal
  real-valued draw.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod

import numpy as np
from scipy import special

from qem.errors import InvalidParameterError

SNAP_BITS = 8
"""The snapping grid is the power of two Lambda in (s 2^-(SNAP_BITS+1), s 2^-SNAP_BITS] for a
noise std s: rounding adds at most Lambda^2 / 12 <= s^2 / 786432 to each coordinate's variance."""

NDTRI_RELATIVE_ERROR = 16.0 * 2.0**-53
"""Assumed bound on |ndtri(u) - Phi^-1(u)| / |Phi^-1(u)| for u in (0, 1/2]: scipy's ndtri is
Cephes', measured at most 7.5 2^-53 (near u = 0.13); tests/test_noise.py checks the bound
against 200-bit arithmetic."""

FLOAT_ERROR_PER_DRAW = 2.0**-49
"""First-order bound on E|computed whitened draw - ideal draw| / s for ``SecureNoise`` (the
inverse-CDF coupling error plus the two roundings of ``snap_to_grid``; docs/theory.md §10a)."""

_SIGN_BIT = np.uint64(1 << 63)


class NoiseSource(ABC):
    """A source of i.i.d. float64 standard normals for the mechanism."""

    secure: bool = False
    """Whether the source is the secure one (the mechanism then snaps by default)."""

    @abstractmethod
    def standard_normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """An array of the given shape of independent Normal(0, 1) draws (float64)."""

    @abstractmethod
    def describe(self) -> dict:
        """Where the normals come from, for the privacy report (``seed_source`` and ``seed``
        first, then the generator and the normal sampler)."""


class _PCG64Noise(NoiseSource):
    """numpy's PCG64 with its ziggurat normal sampler (not a cryptographic generator)."""

    def __init__(self, seed: int | None) -> None:
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        return self._rng.standard_normal(shape)

    def describe(self) -> dict:
        return {
            "seed_source": "os_entropy" if self._seed is None else "user_seed",
            "seed": self._seed,
            "generator": "numpy PCG64"
            + (" seeded with 128 bits of operating-system entropy" if self._seed is None else ""),
            "normal_sampler": "numpy ziggurat (Generator.standard_normal)",
        }


class SeededNoise(_PCG64Noise):
    """PCG64 from a user seed: reproducible, so anyone who knows the seed can subtract the
    noise (tests and experiments only; the report records the seed)."""

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise InvalidParameterError(
                f"seed must be None (operating-system entropy) or an integer >= 0, got {seed!r}."
            )
        super().__init__(int(seed))


class SystemNoise(_PCG64Noise):
    """PCG64 seeded from operating-system entropy (qem's default source)."""

    def __init__(self) -> None:
        super().__init__(None)


def noise_from_seed(seed: int | None) -> NoiseSource:
    """``SeededNoise(seed)`` for an integer seed, ``SystemNoise()`` for None."""
    return SystemNoise() if seed is None else SeededNoise(seed)


def normals_from_uint64(words: np.ndarray) -> np.ndarray:
    """Standard normals by the inverse CDF, one per uniformly random 64-bit word.

    The top bit is the sign; the other 63 bits give i and u = (i + 1/2) 2^-64 in (0, 1/2),
    and |z| = -ndtri(u). Drawing the lower half with its own sign keeps the full relative
    precision of u in both tails (1 - u would round away everything below 2^-53) and makes
    the law exactly symmetric; the largest |z| is -ndtri(2^-65), about 9.2.
    """
    words = np.asarray(words, dtype=np.uint64)
    u = np.ldexp((words & ~_SIGN_BIT).astype(np.float64) + 0.5, -64)
    magnitude = -special.ndtri(u)
    return np.where((words & _SIGN_BIT) != 0, -magnitude, magnitude)


class SecureNoise(NoiseSource):
    """Every normal from the operating system's CSPRNG (``os.urandom``) through
    ``normals_from_uint64``; it takes no seed and records none.

    Its error against an ideal Normal is bounded (``FLOAT_ERROR_PER_DRAW``), which is what the
    snapped release's guarantee needs (docs/theory.md §10a). It is inverse transform sampling
    (Devroye 1986, §II.2) rather than Holohan & Braghin's (2021) sum of 2n normals, whose
    defence is a search cost, not a bound.
    """

    secure = True

    def standard_normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        count = math.prod((shape,) if isinstance(shape, int) else shape)
        words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        return normals_from_uint64(words).reshape(shape)

    def describe(self) -> dict:
        return {
            "seed_source": "os_csprng",
            "seed": None,
            "generator": "operating-system CSPRNG (os.urandom), 64 bits per normal",
            "normal_sampler": "inverse CDF: sign bit, scipy.special.ndtri((i + 1/2) 2^-64)",
        }


def snap_grid(noise_std: float) -> float:
    """Lambda = 2^(floor(log2 s) - SNAP_BITS), the power of two in (s 2^-(c+1), s 2^-c]."""
    _, exponent = math.frexp(noise_std)  # noise_std = f 2^exponent, f in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 - SNAP_BITS)


def snap_to_grid(mean: np.ndarray, noise: np.ndarray, grid: float) -> np.ndarray:
    """The integers t = rint((mean + noise) / grid) (as float64), mean and noise broadcast.

    mean = grid hi + lo exactly (hi = rint(mean / grid), |lo| <= grid / 2: a power-of-two grid
    makes both operations exact), so t = hi + rint((lo + noise) / grid): the one rounded float
    operation, lo + noise, has an error of at most 2^-53 (grid / 2 + |noise|), whatever the
    size of the mean. Needs |mean| < 2^52 grid.
    """
    if not np.all(np.abs(mean) < 2.0**52 * grid):
        raise InvalidParameterError(
            "the whitened mean is too large for the snapping grid (|L^T m| >= 2^52 Lambda)."
        )
    hi = np.rint(mean / grid)
    lo = mean - hi * grid
    return hi + np.rint((lo + noise) / grid)


def float_tv_bound(k: int, noise_std: float, grid: float) -> float:
    """Bound on P[some snapped coordinate differs from the ideal one], for ``SecureNoise``:
    k 2^-47 s / Lambda (twice the first-order k 2 FLOAT_ERROR_PER_DRAW s / Lambda)."""
    return k * 4.0 * FLOAT_ERROR_PER_DRAW * noise_std / grid
