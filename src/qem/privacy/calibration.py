"""Calibration of T rounds of the Poisson-subsampled Gaussian mechanism to a target
(epsilon, delta) with dp-accounting's privacy-loss-distribution (PLD) accountant.

One routine, two callers: DP-SGD (``qem.baselines.dpsgd``, one round per optimiser step) and
qem's Poisson schedule (``qem.schedules.Poisson``, one round per exact draw) spend their budget
through the same events, the same accountant and the same search (docs/theory.md §13):

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)

under the neighbouring relation of the adjacency: ``add_remove`` is dp-accounting's
ADD_OR_REMOVE_ONE, ``replace_one`` its REPLACE_ONE (the replaced record is sampled with
probability q and its clipped contribution moves from -b to +b along one direction; that this
pair dominates every replace-one pair is dp-accounting's claim, which qem relies on). The noise
multiplier z is relative to the per-example bound b of a record's contribution, so the Gaussian
noise has standard deviation z b. The PLD accountant is pessimistic (connect-the-dots
discretisation, Doroshenko et al. 2022): the epsilon it reports is an upper bound.
"""

from __future__ import annotations

import math

from dp_accounting import dp_event, mechanism_calibration

from qem.checks import check_delta, check_epsilon, check_in_interval
from qem.privacy.gdp import calibrate_gdp_mu
from qem.privacy.pld import PLD_DISCRETIZATION, neighboring_relation, pld_accountant
from qem.privacy.sensitivity import Adjacency


def poisson_gaussian_event(
    noise_multiplier: float, sample_rate: float, steps: int
) -> dp_event.DpEvent:
    """T-fold composition of the Poisson-subsampled Gaussian with noise multiplier z."""
    sampled = dp_event.PoissonSampledDpEvent(
        sample_rate, dp_event.GaussianDpEvent(noise_multiplier)
    )
    return dp_event.SelfComposedDpEvent(sampled, steps)


def accountant_epsilon(
    event: dp_event.DpEvent,
    delta: float,
    adjacency: Adjacency | str,
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    """epsilon(delta) of ``event`` by dp-accounting's PLD accountant under ``adjacency``."""
    accountant = pld_accountant(neighboring_relation(adjacency), interval=discretization)
    return float(accountant.compose(event).get_epsilon(check_delta(delta)))


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    adjacency: Adjacency | str = Adjacency.REPLACE_ONE,
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    """The smallest z (to 0.1%) whose T rounds of the Poisson-subsampled Gaussian
    (``poisson_gaussian_event``) meet ``epsilon`` by the PLD accountant (``adjacency`` by
    keyword: a relation given in the wrong place would calibrate for the other one).

    Starts from the central-limit guess of Bu et al. (2020), q sqrt(T (e^{1/z^2} - 1)) = mu
    with mu the GDP parameter of (epsilon, delta) (times 2 under replace-one, whose shift is
    doubled), brackets the root by factors of 1.25 and hands the bracket to dp_accounting's
    calibrate_dp_mechanism, which guarantees that the returned z meets the target.
    """
    epsilon, delta = check_epsilon(epsilon), check_delta(delta)
    adjacency = Adjacency(adjacency)
    check_in_interval("the sampling rate q", sample_rate, 0.0, 1.0, closed="high")
    mu = calibrate_gdp_mu(epsilon, delta) / adjacency.multiplier
    guess = 1.0 / math.sqrt(math.log1p(mu * mu / (sample_rate * sample_rate * steps)))

    def meets_target(z: float) -> bool:
        event = poisson_gaussian_event(z, sample_rate, steps)
        return accountant_epsilon(event, delta, adjacency, discretization) <= epsilon

    lo = hi = guess  # invariant after the loops: lo misses the target, hi meets it
    if meets_target(guess):
        while meets_target(lo):
            lo, hi = lo / 1.25, lo
    else:
        while not meets_target(hi):
            lo, hi = hi, hi * 1.25
    return float(
        mechanism_calibration.calibrate_dp_mechanism(
            lambda: pld_accountant(neighboring_relation(adjacency), interval=discretization),
            lambda z: poisson_gaussian_event(z, sample_rate, steps),
            epsilon,
            delta,
            mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=1e-3 * lo,
        )
    )
