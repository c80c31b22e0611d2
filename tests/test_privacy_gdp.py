"""The exact privacy profile of a mu-GDP release, its inverse, calibration and composition
(qem.privacy.gdp, docs/theory.md §3-§5), checked against dp-accounting and mpmath."""

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from scipy import integrate, stats

from qem.errors import InvalidParameterError
from qem.privacy import (
    calibrate_gdp_mu,
    check_delta,
    check_epsilon,
    compose_gdp,
    gdp_delta,
    gdp_epsilon,
    gdp_log_delta,
    gdp_renyi,
)

MUS = np.geomspace(0.05, 5.0, 12)
EPSILONS = np.linspace(0.0, 20.0, 21)


def _mp_delta(mu: float, eps: float) -> mpmath.mpf:
    """Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) at 80 significant digits."""
    with mpmath.workdps(80):
        mu, eps = mpmath.mpf(mu), mpmath.mpf(eps)
        return mpmath.ncdf(-eps / mu + mu / 2) - mpmath.exp(eps) * mpmath.ncdf(-eps / mu - mu / 2)


def test_delta_matches_dp_accounting_gaussian_privacy_loss():
    """delta(eps) is the hockey-stick divergence of a Gaussian mechanism with sensitivity 1 and
    standard deviation 1/mu, which dp-accounting evaluates analytically."""
    checked = 0
    for mu in MUS:
        reference = privacy_loss_mechanism.GaussianPrivacyLoss(
            standard_deviation=1.0 / mu
        ).get_delta_for_epsilon(EPSILONS)
        ours = gdp_delta(mu, EPSILONS)
        keep = reference > 1e-300
        np.testing.assert_allclose(ours[keep], reference[keep], rtol=1e-6, atol=0)
        checked += int(keep.sum())
    assert checked > 150  # the grid is not mostly skipped


def test_delta_matches_the_discretised_pld():
    """dp-accounting's connect-the-dots privacy-loss distribution (a numerical path independent
    of the closed form) gives the same delta."""
    for mu, eps in [(0.3, 0.5), (1.0, 2.0)]:
        pld = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=1.0 / mu, value_discretization_interval=1e-4
        )
        assert gdp_delta(mu, eps) == pytest.approx(pld.get_delta_for_epsilon(eps), rel=1e-9)


@pytest.mark.parametrize(
    ("mu", "eps"),
    [(0.5, 0.5), (1.0, 5.0), (3.0, 20.0), (6.0, 50.0), (5.2435, 50.0), (12.0, 50.0)],
)
def test_log_space_accuracy_against_mpmath(mu, eps):
    """Across eps up to 50 and delta from 1 down to about 1e-12."""
    reference = _mp_delta(mu, eps)
    assert float(reference) > 1e-13
    assert gdp_delta(mu, eps) == pytest.approx(float(reference), rel=1e-12)


@pytest.mark.parametrize(
    ("mu", "eps"), [(0.05, 2.0), (0.1, 5.0), (1.0, 50.0), (0.01, 1.0), (1e-3, 50.0)]
)
def test_log_delta_far_below_float64_range(mu, eps):
    """Where delta underflows float64 (Phi(-eps/mu) < 1e-300) log delta stays exact."""
    with mpmath.workdps(80):
        reference = float(mpmath.log(_mp_delta(mu, eps)))
    assert reference < -700
    assert gdp_log_delta(mu, eps) == pytest.approx(reference, rel=1e-13)


def test_delta_is_monotone_and_starts_at_total_variation():
    grid_eps = np.linspace(0.0, 10.0, 101)
    for mu in MUS:
        log_deltas = gdp_log_delta(mu, grid_eps)
        assert np.all(np.diff(log_deltas) < 0)
        # delta(0) = TV(N(0,1), N(mu,1)) = 2 Phi(mu/2) - 1
        assert math.exp(log_deltas[0]) == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1, rel=1e-12)
    assert np.all(np.diff([gdp_delta(mu, 1.0) for mu in MUS]) > 0)


def test_array_and_scalar_evaluation_agree():
    array = gdp_delta(0.7, EPSILONS)
    assert array.shape == EPSILONS.shape
    assert all(
        gdp_delta(0.7, float(e)) == pytest.approx(d) for e, d in zip(EPSILONS, array, strict=True)
    )
    assert isinstance(gdp_log_delta(0.7, 1.0), float)


@pytest.mark.parametrize("eps", np.geomspace(0.05, 20.0, 7))
@pytest.mark.parametrize("delta", np.geomspace(1e-12, 1e-2, 5))
def test_calibration_round_trip(eps, delta):
    mu = calibrate_gdp_mu(eps, delta)
    assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-10)
    # independent: dp-accounting's analytic Gaussian mechanism (Balle & Wang 2018)
    sigma = dp_accounting.get_sigma_gaussian(eps, delta, tol=1e-14)
    assert mu == pytest.approx(1.0 / sigma, rel=1e-8)


def test_calibration_reference_value():
    mu = calibrate_gdp_mu(1.0, 1e-5)
    assert round(mu, 4) == 0.2681
    assert mu == pytest.approx(0.26805112321, abs=1e-10)


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 3.0, 5.0])
def test_epsilon_inverts_delta(mu):
    for eps in [0.01, 0.5, 2.0, 8.0, 20.0]:
        delta = gdp_delta(mu, eps)
        if not 1e-300 < delta < 1:
            continue
        assert gdp_epsilon(mu, delta) == pytest.approx(eps, rel=1e-9)


def test_epsilon_is_zero_when_delta_exceeds_total_variation():
    mu = 0.5
    tv = gdp_delta(mu, 0.0)
    assert gdp_epsilon(mu, min(2 * tv, 0.99)) == 0.0
    assert gdp_epsilon(mu, tv * 0.999) > 0.0


def test_epsilon_and_calibration_are_mutual_inverses():
    for eps, delta in [(0.5, 1e-6), (4.0, 1e-5), (16.0, 1e-10)]:
        assert gdp_epsilon(calibrate_gdp_mu(eps, delta), delta) == pytest.approx(eps, rel=1e-9)


def test_compose_gdp_is_root_sum_of_squares():
    assert compose_gdp([0.3, 0.4, 1.2]) == pytest.approx(1.3, rel=1e-15)
    assert compose_gdp(m for m in [0.6] * 4) == pytest.approx(1.2, rel=1e-15)
    assert compose_gdp([0.7]) == 0.7


def test_compose_gdp_matches_a_single_gaussian_of_the_stacked_shift():
    """Composing Gaussian mechanisms with shifts mu_t is one Gaussian with the stacked shift
    vector; its privacy loss is Normal(|m|^2/2, |m|^2), the profile of sqrt(sum mu_t^2)-GDP."""
    mus = [0.4, 0.9, 0.2]
    total = float(np.linalg.norm(mus))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400_000, 3))
    loss = z @ np.asarray(mus) + total**2 / 2  # log-likelihood ratio under N(mus, I)
    eps = 1.0
    mc_delta = np.mean(np.maximum(0.0, 1.0 - np.exp(eps - loss)))
    assert mc_delta == pytest.approx(gdp_delta(compose_gdp(mus), eps), rel=0.02)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 8.0])
def test_renyi_divergence_by_quadrature(mu, alpha):
    """D_alpha(N(mu,1) || N(0,1)) = 1/(alpha-1) log int p^alpha q^(1-alpha) = alpha mu^2 / 2."""

    def integrand(x: float) -> float:
        return math.exp(alpha * stats.norm.logpdf(x, mu) + (1 - alpha) * stats.norm.logpdf(x))

    integral, _ = integrate.quad(integrand, -40, 40, points=[alpha * mu], limit=200)
    assert gdp_renyi(mu, alpha) == pytest.approx(math.log(integral) / (alpha - 1), rel=1e-8)
    orders = np.array([2.0, 4.0])
    np.testing.assert_allclose(gdp_renyi(mu, orders), orders * mu * mu / 2)


BAD_POSITIVE = [0.0, -1.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD_POSITIVE)
def test_bad_mu_is_rejected_everywhere(bad):
    calls = [
        lambda: gdp_delta(bad, 1.0),
        lambda: gdp_log_delta(bad, 1.0),
        lambda: gdp_epsilon(bad, 1e-5),
        lambda: compose_gdp([1.0, bad]),
        lambda: gdp_renyi(bad, 2.0),
    ]
    for call in calls:
        with pytest.raises(InvalidParameterError, match="mu"):
            call()


@pytest.mark.parametrize("bad", BAD_POSITIVE)
def test_bad_epsilon_is_rejected(bad):
    with pytest.raises(InvalidParameterError, match="epsilon"):
        calibrate_gdp_mu(bad, 1e-5)
    with pytest.raises(InvalidParameterError, match="epsilon"):
        check_epsilon(bad)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, [0.5, math.nan], [1.0, -0.1]])
def test_bad_profile_epsilon_is_rejected(bad):
    with pytest.raises(InvalidParameterError, match="epsilon"):
        gdp_delta(1.0, bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 1.5, math.nan, math.inf])
def test_bad_delta_is_rejected(bad):
    with pytest.raises(InvalidParameterError, match="delta"):
        calibrate_gdp_mu(1.0, bad)
    with pytest.raises(InvalidParameterError, match="delta"):
        gdp_epsilon(1.0, bad)
    with pytest.raises(InvalidParameterError, match="delta"):
        check_delta(bad)


def test_other_bad_inputs():
    with pytest.raises(InvalidParameterError, match="at least one"):
        compose_gdp([])
    for orders in [1.0, 0.5, math.nan, math.inf, [2.0, 1.0]]:
        with pytest.raises(InvalidParameterError, match="orders"):
            gdp_renyi(1.0, orders)
