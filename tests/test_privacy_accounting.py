"""qem releases inside dp-accounting's accountants (qem.privacy.accounting): the event encoding,
composition with other mechanisms, and the PLD cross-checks."""

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from qem.errors import InvalidParameterError
from qem.privacy import (
    compose_gdp,
    compose_with_dp_events,
    gdp_delta,
    gdp_dp_event,
    gdp_epsilon,
    gdp_renyi,
    pld_delta,
    pld_epsilon,
)

DELTA = 1e-5
H = 1e-3  # PLD discretisation: ~1e-7 relative on these eps, ten times faster than the default


def test_event_is_a_gaussian_with_noise_multiplier_one_over_mu():
    event = gdp_dp_event(0.25)
    assert isinstance(event, dp_accounting.GaussianDpEvent)
    assert event.noise_multiplier == pytest.approx(4.0, rel=1e-15)


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 3.0])
def test_pld_epsilon_of_one_release_matches_the_closed_form(mu):
    exact = gdp_epsilon(mu, DELTA)
    via_pld = pld_epsilon(mu, DELTA, value_discretization_interval=H)
    assert via_pld == pytest.approx(exact, rel=1e-3)
    assert via_pld >= exact * (1 - 1e-9)  # the PLD accountant is pessimistic


def test_pld_epsilon_default_discretisation():
    assert pld_epsilon(1.0, DELTA) == pytest.approx(gdp_epsilon(1.0, DELTA), rel=1e-6)


def test_compose_gdp_matches_the_pld_accountant():
    mus = [0.3, 0.5, 1.1, 0.2]
    exact = gdp_epsilon(compose_gdp(mus), DELTA)
    assert compose_with_dp_events(
        mus, delta=DELTA, value_discretization_interval=H
    ) == pytest.approx(exact, rel=1e-3)
    # 25 rounds at mu = 0.2 are one 1-GDP release
    repeated = dp_accounting.SelfComposedDpEvent(gdp_dp_event(0.2), 25)
    assert compose_with_dp_events(
        [], [repeated], delta=DELTA, value_discretization_interval=H
    ) == pytest.approx(gdp_epsilon(1.0, DELTA), rel=1e-3)


def test_mixed_pipeline_with_gaussian_and_dp_sgd_stages():
    """A qem release composed with another Gaussian stage is GDP with the combined mu; adding
    a DP-SGD stage (Poisson-subsampled Gaussian, 300 steps) costs strictly more."""
    other = dp_accounting.GaussianDpEvent(noise_multiplier=2.0)  # 0.5-GDP
    mixed = compose_with_dp_events([0.8], [other], delta=DELTA, value_discretization_interval=H)
    assert mixed == pytest.approx(gdp_epsilon(math.hypot(0.8, 0.5), DELTA), rel=1e-3)

    dp_sgd = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(0.9)), 300
    )
    alone = compose_with_dp_events([], [dp_sgd], delta=DELTA, value_discretization_interval=H)
    both = compose_with_dp_events([0.8], [dp_sgd], delta=DELTA, value_discretization_interval=H)
    assert both > max(alone, gdp_epsilon(0.8, DELTA)) * 1.05
    assert both < alone + gdp_epsilon(0.8, DELTA)  # tighter than basic composition


@pytest.mark.parametrize("mu", [0.2, 1.0, 2.5])
def test_renyi_matches_the_rdp_accountant(mu):
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(gdp_dp_event(mu))
    orders = np.asarray(accountant.orders, dtype=np.float64)
    np.testing.assert_allclose(gdp_renyi(mu, orders), accountant.rdp, rtol=1e-12)


def test_rdp_method_is_a_looser_upper_bound():
    mus = [0.5, 0.5]
    exact = gdp_epsilon(compose_gdp(mus), DELTA)
    via_rdp = compose_with_dp_events(mus, delta=DELTA, method="rdp")
    assert exact < via_rdp < 1.5 * exact


@pytest.mark.parametrize(("mu", "eps"), [(0.5, 0.5), (1.0, 3.0), (2.0, 8.0), (4.0, 20.0)])
def test_pld_delta_against_mpmath(mu, eps):
    with mpmath.workdps(60):
        m, e = mpmath.mpf(mu), mpmath.mpf(eps)
        ref = mpmath.ncdf(-e / m + m / 2) - mpmath.exp(e) * mpmath.ncdf(-e / m - m / 2)
    assert pld_delta(mu, eps) == pytest.approx(float(ref), rel=1e-8)


def test_pld_delta_accepts_arrays():
    eps = np.array([[0.0, 1.0], [2.0, 4.0]])
    out = pld_delta(1.5, eps)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, gdp_delta(1.5, eps), rtol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_bad_mu(bad):
    for call in [
        lambda: gdp_dp_event(bad),
        lambda: pld_delta(bad, 1.0),
        lambda: pld_epsilon(bad, DELTA),
        lambda: compose_with_dp_events([0.5, bad], delta=DELTA),
    ]:
        with pytest.raises(InvalidParameterError, match="mu"):
            call()


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0, math.nan, math.inf])
def test_bad_delta(bad):
    with pytest.raises(InvalidParameterError, match="delta"):
        compose_with_dp_events([0.5], delta=bad)
    with pytest.raises(InvalidParameterError, match="delta"):
        pld_epsilon(0.5, bad)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_epsilon(bad):
    with pytest.raises(InvalidParameterError, match="epsilon"):
        pld_delta(1.0, bad)


def test_bad_composition_requests():
    with pytest.raises(InvalidParameterError, match="at least one"):
        compose_with_dp_events([], delta=DELTA)
    with pytest.raises(InvalidParameterError, match="DpEvent"):
        compose_with_dp_events([0.5], [0.5], delta=DELTA)
    with pytest.raises(InvalidParameterError, match="method"):
        compose_with_dp_events([0.5], delta=DELTA, method="moments")
    with pytest.raises(InvalidParameterError, match="value_discretization_interval"):
        pld_epsilon(0.5, DELTA, value_discretization_interval=0.0)
    with pytest.raises(InvalidParameterError, match="cannot compose"):
        compose_with_dp_events([0.5], [dp_accounting.UnsupportedDpEvent()], delta=DELTA)
