"""Gaussian differential privacy (Dong, Roth & Su 2022): the exact privacy profile of a
mu-GDP release, its inverse, calibration and composition.

A mu-GDP release is exactly as private as telling apart N(0, 1) from N(mu, 1). Its privacy
profile (Balle & Wang 2018, Theorem 8; Dong et al. Corollary 2.13) is

    delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2),

evaluated here in log space, so that it stays accurate for eps up to 50 and delta down to 1e-12
(and far below).
Everything is float64 numpy/scipy; nothing here knows about models or data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
from scipy import special

from qem.checks import check_delta, check_epsilon, check_positive
from qem.errors import InvalidParameterError, PrivacyWarning

_SQRT_HALF = math.sqrt(0.5)


def _check_mu(mu: float) -> float:
    return check_positive("mu", mu)


def warn_large_delta(delta: float, N: float) -> None:
    """PrivacyWarning when delta >= 1/N (docs/theory.md §12): a mechanism that publishes one
    record in the clear meets such a guarantee. Every calibration path calls this."""
    if delta >= 1.0 / N:
        warnings.warn(
            f"delta = {delta:.3g} >= 1/N = {1.0 / N:.3g}: a mechanism that publishes one record "
            "outright would meet this guarantee; choose delta well below 1/N.",
            PrivacyWarning,
            stacklevel=3,
        )


def check_profile_epsilon(epsilon: float | np.ndarray) -> np.ndarray:
    """epsilon as a float64 array at which a privacy profile may be evaluated: finite, >= 0."""
    eps = np.asarray(epsilon, dtype=np.float64)
    if not np.all(np.isfinite(eps) & (eps >= 0)):
        raise InvalidParameterError(
            f"epsilon must be finite and >= 0 to evaluate the privacy profile, got {epsilon!r}."
        )
    return eps


def gdp_log_delta(mu: float, epsilon: float | np.ndarray) -> float | np.ndarray:
    """log delta(eps) of a mu-GDP release, computed without cancellation.

    With t1 = eps/mu - mu/2, t2 = eps/mu + mu/2, a = Phi(-t1) and b = exp(eps) Phi(-t2) < a,
    log delta = log a + log(1 - b/a) = log a + log(-expm1(log(b/a))). In the tail (t1 > 1) the
    ratio uses Phi(-t) = erfcx(t/sqrt 2) exp(-t^2/2) / 2: since t2^2 - t1^2 = 2 eps, the
    exponentials cancel eps exactly and b/a = erfcx(t2/sqrt 2) / erfcx(t1/sqrt 2), so that
    log delta keeps its relative accuracy far below the smallest float64 (eps up to 50 and
    beyond). A delta that underflows even in log space (1 - b/a below ~1e-16) gives -inf.
    """
    mu = _check_mu(mu)
    eps = check_profile_epsilon(epsilon)
    t1, t2 = eps / mu - mu / 2.0, eps / mu + mu / 2.0
    tail = t1 > 1.0
    log_ratio_tail = np.log(special.erfcx(t2 * _SQRT_HALF)) - np.log(
        special.erfcx(np.maximum(t1, 1.0) * _SQRT_HALF)
    )
    log_ratio_bulk = eps + special.log_ndtr(-t2) - special.log_ndtr(-t1)
    with np.errstate(divide="ignore"):
        out = special.log_ndtr(-t1) + np.log(
            -np.expm1(np.where(tail, log_ratio_tail, log_ratio_bulk))
        )
    return float(out) if out.ndim == 0 else out


def gdp_delta(mu: float, epsilon: float | np.ndarray) -> float | np.ndarray:
    """delta(eps) of a mu-GDP release: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    return np.exp(gdp_log_delta(mu, epsilon))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps >= 0 with delta(eps) <= delta for a mu-GDP release.

    delta(eps) is decreasing in eps; since delta(eps) <= Phi(-eps/mu + mu/2), the root lies
    below eps_hi = mu (mu/2 - Phi^-1(delta)).
    """
    mu = _check_mu(mu)
    delta = check_delta(delta)
    log_target = math.log(delta)
    if gdp_log_delta(mu, 0.0) <= log_target:
        return 0.0
    eps_hi = max(mu * (mu / 2.0 - special.ndtri(delta)), 1e-12)
    while gdp_log_delta(mu, eps_hi) > log_target:  # guards rounding at the bracket's edge
        eps_hi *= 2.0
    from scipy.optimize import brentq  # imported on first use, to keep ``import qem`` light

    return float(
        brentq(lambda e: gdp_log_delta(mu, e) - log_target, 0.0, eps_hi, xtol=1e-15, rtol=1e-15)
    )


def calibrate_gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose release is (eps, delta)-DP: the root of delta_mu(eps) = delta.

    delta_mu(eps) increases with mu, so the root is found by bracketing in log mu.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    log_target = math.log(delta)

    def gap(log_mu: float) -> float:
        return gdp_log_delta(math.exp(log_mu), epsilon) - log_target

    lo, hi = math.log(1e-3), math.log(1.0)
    while gap(lo) > 0:
        lo -= 2.0
    while gap(hi) < 0:
        hi += 1.0
    from scipy.optimize import brentq

    return math.exp(brentq(gap, lo, hi, xtol=1e-15, rtol=1e-15))


def compose_gdp(mus: Iterable[float]) -> float:
    """Composition of mu_t-GDP releases, adaptive or not: sqrt(sum mu_t^2).

    Dong, Roth & Su 2022, Corollary 3.3.
    """
    values = [_check_mu(m) for m in mus]
    if not values:
        raise InvalidParameterError("compose_gdp needs at least one mu.")
    return math.sqrt(math.fsum(m * m for m in values))


def gdp_renyi(mu: float, orders: float | np.ndarray) -> float | np.ndarray:
    """Renyi divergence of order alpha of a mu-GDP release: alpha mu^2 / 2.

    Mironov 2017, Proposition 7 (Gaussian mechanism with sensitivity/sigma = mu).
    """
    mu = _check_mu(mu)
    alpha = np.asarray(orders, dtype=np.float64)
    if not np.all(np.isfinite(alpha) & (alpha > 1)):
        raise InvalidParameterError(f"Renyi orders must be finite and > 1, got {orders!r}.")
    out = alpha * mu * mu / 2.0
    return float(out) if out.ndim == 0 else out
