"""Pure eps-DP mode (docs/theory.md §6): the exponential mechanism restricted to the ball
W_R = {w : ||w||_A <= R}.

On W_R the utility u(w; D) = -(sum_i gh_i^T w + (N lam/2) w^T A w) changes between neighbours
by at most Delta_u = sup_{||w||_A <= R} |(gh_j - gh_j')^T w| = R ||gh_j - gh_j'||_{A^-1}
<= R * bound, so beta = eps / (2 Delta_u) makes the restricted mechanism eps-DP
(McSherry & Talwar 2007, Theorem 6).

The exact sampler draws w ~ Normal(m_D, (beta N lam A)^-1) and rejects until ||w||_A <= R.
In whitened coordinates z = sqrt(beta N lam) L^T w (A = L L^T) the draw is Normal with identity
covariance and mean of norm sqrt(beta N lam) ||m_D||_A, so

    P(accept) = P( chi'^2_k(nc) <= beta N lam R^2 ),  nc = beta N lam ||m_D||_A^2,

a noncentral chi-square. Acceptance falls as ||m_D||_A grows, and ||m_D||_A =
||sum_i gh_i||_{A^-1} / (N lam) <= n_max b / (N lam) with b the per-example dual-norm bound, so the
worst case over all datasets of at most n_max records is computable from public numbers.
"""

from __future__ import annotations

import math

from scipy import special

from qem.checks import check_count, check_epsilon, check_in_interval, check_positive
from qem.errors import RejectionSamplingError
from qem.privacy.sensitivity import Sensitivity

MIN_ACCEPTANCE = 1e-3
"""Below this worst-case acceptance probability the sampler refuses to run."""


def _check_dimension(k: int) -> int:
    return check_count("the subspace dimension k", k)


def pure_beta(epsilon: float, radius: float, sensitivity: Sensitivity) -> float:
    """beta = eps / (2 Delta_u) with Delta_u = R * sup ||gh_j - gh_j'||_{A^-1}."""
    epsilon = check_epsilon(epsilon)
    radius = check_positive("radius R", radius, "R bounds ||w||_A; try choose_radius().")
    return epsilon / (2.0 * radius * sensitivity.dual_norm_bound)


def utility_sensitivity(radius: float, sensitivity: Sensitivity) -> float:
    """Delta_u = R * sup ||gh_j - gh_j'||_{A^-1} <= s C R (dual clipping)."""
    return check_positive("radius R", radius) * sensitivity.dual_norm_bound


def worst_case_acceptance(
    k: int,
    radius: float,
    beta: float,
    N: float,
    lam: float,
    sensitivity: Sensitivity,
    n_max: float,
) -> float:
    """Smallest P(||w||_A <= R) over all datasets of at most n_max clipped gradients."""
    k = _check_dimension(k)
    radius = check_positive("radius R", radius)
    beta = check_positive("beta", beta)
    scale = check_positive("N", N) * check_positive("lam", lam) * beta
    n_max = check_positive("n_max", n_max)
    mean_norm_bound = n_max * sensitivity.per_example_dual_bound / (N * lam)
    noncentrality = scale * mean_norm_bound**2
    # the noncentral chi-square CDF, from scipy.special (scipy.stats' ncx2.cdf calls the same
    # function, but scipy.stats takes ~0.4 s to import)
    return float(special.chndtr(scale * radius**2, k, noncentrality))


def acceptance_at_radius(
    epsilon: float,
    k: int,
    radius: float,
    N: float,
    lam: float,
    sensitivity: Sensitivity,
    n_max: float,
) -> float:
    """Worst-case acceptance when beta is calibrated to eps at this radius."""
    beta = pure_beta(epsilon, radius, sensitivity)
    return worst_case_acceptance(k, radius, beta, N, lam, sensitivity, n_max)


def choose_radius(
    epsilon: float,
    k: int,
    N: float,
    lam: float,
    sensitivity: Sensitivity,
    n_max: float,
    target_acceptance: float = 0.5,
) -> float:
    """The smallest R whose worst-case acceptance reaches ``target_acceptance``.

    With beta = eps/(2 R b_s) the chi-square threshold grows like R and the noncentrality
    shrinks like 1/R, so acceptance increases with R; a smaller R means a larger beta (less
    noise), hence the smallest R that is fast enough.
    """
    check_in_interval("target_acceptance", target_acceptance, 0.0, 1.0)

    def gap(log_r: float) -> float:
        acc = acceptance_at_radius(epsilon, k, math.exp(log_r), N, lam, sensitivity, n_max)
        return acc - target_acceptance

    lo, hi = math.log(1e-6), math.log(1.0)
    while gap(lo) > 0:
        lo -= 4.0
    while gap(hi) < 0:
        hi += 2.0
        if hi > 700:
            raise RejectionSamplingError("no radius reaches the target acceptance.")
    from scipy.optimize import brentq

    return math.exp(brentq(gap, lo, hi, xtol=1e-12))


def check_acceptance(acceptance: float) -> None:
    """Refuse a radius whose worst-case acceptance is below MIN_ACCEPTANCE."""
    if not acceptance >= MIN_ACCEPTANCE:  # also refuses NaN
        raise RejectionSamplingError(
            f"the worst-case acceptance probability of the pure-eps sampler is {acceptance:.3g}"
            f" (< {MIN_ACCEPTANCE}): an expected {1 / max(acceptance, 1e-300):.3g} draws. "
            "Increase the radius R (or let qem choose it), or use the Gaussian-DP mode."
        )
