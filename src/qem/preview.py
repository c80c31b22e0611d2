"""What a budget buys before any data is read, in closed form for any subspace dimension k
(docs/theory.md §7): the numbers of ``QuadraticExponentialMechanism.preview()`` without a k x k
matrix, since they depend on A only through k and lambda_min(A).

With b the per-example dual-norm bound (C, or C / sqrt(lambda_min(A)) under Euclidean
clipping; qem.privacy.sensitivity) and s = 2 (replace-one) or 1 (add/remove):

* Gaussian-DP round with noise multiplier z (docs/theory.md §13): beta = N lam / (z b)^2 and
  mu = s / z;
* pure round with budget eps: R = choose_radius(...) unless given, beta = eps / (2 R s b), and
  the worst-case acceptance P(chi'^2_k(nc) <= beta N lam R^2) with nc = beta N lam (n_max b /
  (N lam))^2 (qem.privacy.pure: a noncentral chi-square in whitened coordinates);
* both: noise scale 1 / sqrt(beta N lam) (std of each coordinate of L^T w),
  max Euclidean std 1 / sqrt(beta N lam lambda_min(A)), expected excess of the surrogate
  E[F_D(w)] - F_D(m_D) = k / (2 beta N).

The rounds of the default sequential schedule (``rounds`` = T) are mu / sqrt(T) GDP each, or
eps / T pure, as qem.schedules.Sequential calibrates them (a test checks the two agree); other
schedules go through qem.schedules itself (:func:`schedule_round`). Imports neither torch nor
dp-accounting on the sequential path (scipy.special only), so that ``qem preview``
answers at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qem.checks import check_count, check_delta, check_epsilon
from qem.errors import InvalidParameterError
from qem.privacy.gdp import calibrate_gdp_mu, warn_large_delta
from qem.privacy.sensitivity import Adjacency, ClipNorm, Sensitivity, check_positive, gdp_mu

TARGET_ACCEPTANCE = 0.5
"""Worst-case acceptance the pure mode aims at when it chooses R (the mechanism's own
TARGET_ACCEPTANCE; a test checks they agree)."""


@dataclass(frozen=True)
class RoundBudget:
    """One round's privacy parameter and public weight: ``N`` (N_t), and ``noise_multiplier``
    z (Gaussian-DP) or ``epsilon`` (pure); ``rounds`` and ``mu`` describe the whole run (mu
    composed, None when the run is not a GDP statement)."""

    N: float
    noise_multiplier: float | None
    epsilon: float | None
    rounds: int
    mu: float | None


def sequential_round(
    epsilon: float,
    delta: float | None,
    mode: str,
    adjacency: Adjacency | str,
    N: float,
    rounds: int = 1,
) -> RoundBudget:
    """Every round of ``rounds`` sequential rounds on all N records: mu_t = mu / sqrt(T) with
    mu calibrated to (epsilon, delta), z = s / mu_t (Gaussian-DP), or epsilon / T (pure)."""
    epsilon = check_epsilon(epsilon)
    N = check_positive("N", N)
    rounds = check_count("rounds", rounds)
    if mode == "pure":
        return RoundBudget(N, None, epsilon / rounds, rounds, None)
    delta = check_delta(delta)
    warn_large_delta(delta, N)
    mu = calibrate_gdp_mu(epsilon, delta)
    multiplier = Adjacency(adjacency).multiplier
    return RoundBudget(N, multiplier / (mu / math.sqrt(rounds)), None, rounds, mu)


def noise_dominated_rounds(
    epsilon: float, delta: float, adjacency: Adjacency | str, n: float, k: int
) -> float:
    """T* = (n mu / (s sqrt(k)))^2: beyond T* sequential rounds on n records, the noise of a
    round (norm about s C sqrt(T) sqrt(k) / mu, s the adjacency's sensitivity multiplier, mu the
    budget's Gaussian-DP mu) exceeds the largest clipped gradient sum it can carry (n C, every
    gradient aligned), so that each round is mostly noise. A bound on the useful number of
    rounds, not a recommendation (real gradient sums are shorter than n C)."""
    mu = calibrate_gdp_mu(check_epsilon(epsilon), check_delta(delta))
    multiplier = Adjacency(adjacency).multiplier
    return (n * mu / (multiplier * math.sqrt(k))) ** 2


def schedule_round(
    schedule: dict, epsilon: float, delta: float | None, mode: str, adjacency: str, N: float
) -> RoundBudget:
    """The first round of ``schedule`` (its JSON form, qem.schedules.make_schedule) calibrated
    by qem.schedules for N records (imports dp-accounting)."""
    from qem.privacy.budget import Budget
    from qem.schedules import make_schedule

    delta = None if mode == "pure" else check_delta(delta)
    budget = Budget(check_epsilon(epsilon), delta, mode, Adjacency(adjacency), N=N)
    plan = make_schedule(schedule).plan(budget, int(N))
    first = next(iter(plan.rounds()))
    return RoundBudget(
        first.N, first.noise_multiplier, first.epsilon, plan.schedule.total_rounds, plan.mu
    )


def closed_form_preview(
    budget: RoundBudget,
    *,
    k: int,
    lambda_min: float,
    lam: float = 1.0,
    clip_norm: float,
    adjacency: Adjacency | str = Adjacency.REPLACE_ONE,
    clipping: ClipNorm | str = ClipNorm.DUAL,
    mode: str = "gdp",
    radius: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
) -> dict:
    """The fields of ``qem.mechanism.Preview`` for one round (module docstring), for A of
    dimension ``k`` and smallest eigenvalue ``lambda_min``; ``epsilon``/``delta`` are the
    run's target, echoed."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParameterError(f"the subspace dimension k must be an integer >= 1, got {k!r}.")
    lam = check_positive("lam", lam, "lam weighs the quadratic; try 1.0.")
    lambda_min = check_positive("lambda_min(A)", lambda_min, "Increase the damping gamma.")
    sensitivity = Sensitivity(clip_norm, adjacency, clipping, lambda_min)
    N = budget.N
    if mode == "pure":
        from qem.privacy.pure import check_acceptance, choose_radius, pure_beta
        from qem.privacy.pure import worst_case_acceptance as acceptance_of

        if radius is None:
            radius = choose_radius(budget.epsilon, k, N, lam, sensitivity, N, TARGET_ACCEPTANCE)
        radius = check_positive("radius R", radius)
        beta = pure_beta(budget.epsilon, radius, sensitivity)
        acceptance = acceptance_of(k, radius, beta, N, lam, sensitivity, N)
        check_acceptance(acceptance)
        mu = None
    else:
        z = check_positive("noise multiplier z", budget.noise_multiplier)
        beta = N * lam / (z * sensitivity.per_example_dual_bound) ** 2
        mu = gdp_mu(beta, N, lam, sensitivity)
        radius = acceptance = None
    precision = beta * N * lam
    return {
        "k": k,
        "N": N,
        "lam": lam,
        "mode": mode,
        "adjacency": sensitivity.adjacency.value,
        "clipping": sensitivity.clipping.value,
        "clip_norm": float(clip_norm),
        "epsilon": epsilon,
        "delta": delta if mode == "gdp" else 0.0,
        "mu": mu,
        "beta": beta,
        "noise_scale": 1.0 / math.sqrt(precision),
        "max_euclidean_std": 1.0 / math.sqrt(precision * lambda_min),
        "expected_excess_loss": k / (2.0 * beta * N),
        "radius": radius,
        "worst_case_acceptance": acceptance,
    }
