"""qem releases in Google's dp-accounting library, to compose them with other mechanisms
(DP-SGD stages, ...) and to cross-check qem's closed forms.

A mu-GDP release is exactly as private as a Gaussian mechanism with sensitivity 1 and noise
standard deviation 1/mu (Dong, Roth & Su 2022, Theorem 2.7). In dp-accounting that is
``GaussianDpEvent(noise_multiplier=1/mu)`` under the ADD_OR_REMOVE_ONE neighbouring relation.
qem's mu contains the neighbour multiplier s of its adjacency (docs/theory.md §2), so the
accountants here always use ADD_OR_REMOVE_ONE: under REPLACE_ONE, dp-accounting's PLD accountant
doubles the shift of a GaussianDpEvent (its RDP accountant does not). The other events must be
privacy statements about the same adjacency as the qem release.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

from qem.checks import check_delta, check_positive
from qem.errors import InvalidParameterError
from qem.privacy.gdp import _check_mu, check_profile_epsilon
from qem.privacy.pld import pld_accountant

ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def gdp_dp_event(mu: float) -> dp_accounting.GaussianDpEvent:
    """A mu-GDP release as a dp-accounting event: GaussianDpEvent(noise_multiplier=1/mu)."""
    return dp_accounting.GaussianDpEvent(noise_multiplier=1.0 / _check_mu(mu))


def compose_with_dp_events(
    mus: Iterable[float],
    other_events: Iterable[dp_accounting.DpEvent] = (),
    *,
    delta: float,
    method: Literal["pld", "rdp"] = "pld",
    value_discretization_interval: float = 1e-4,
) -> float:
    """eps at ``delta`` of the qem releases ``mus`` composed with ``other_events``.

    ``method="pld"``: privacy-loss-distribution accountant (Koskela et al. 2020; Doroshenko et al.
    2022), pessimistic discretisation, so eps is an upper bound within about the discretisation
    interval of the exact value. ``method="rdp"``: Renyi accountant (Mironov 2017), looser.
    """
    delta = check_delta(delta)
    events = [gdp_dp_event(mu) for mu in mus]
    for event in other_events:
        if not isinstance(event, dp_accounting.DpEvent):
            raise InvalidParameterError(
                f"other_events must hold dp_accounting.DpEvent objects, got {event!r}."
            )
        events.append(event)
    if not events:
        raise InvalidParameterError("compose_with_dp_events needs at least one mu or event.")
    if method == "pld":
        interval = check_positive("value_discretization_interval", value_discretization_interval)
        accountant = pld_accountant(ADD_OR_REMOVE, interval=interval)
    elif method == "rdp":
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=ADD_OR_REMOVE)
    else:
        raise InvalidParameterError(f"method must be 'pld' or 'rdp', got {method!r}.")
    try:
        accountant.compose(dp_accounting.ComposedDpEvent(events))
    except dp_accounting.UnsupportedEventError as err:
        raise InvalidParameterError(
            f"the {method} accountant cannot compose these events ({err}); try the other method."
        ) from err
    return float(accountant.get_epsilon(delta))


def pld_epsilon(mu: float, delta: float, value_discretization_interval: float = 1e-4) -> float:
    """eps at ``delta`` of one mu-GDP release by dp-accounting's PLD accountant (an upper bound,
    within about ``value_discretization_interval`` of :func:`qem.privacy.gdp_epsilon`)."""
    return compose_with_dp_events(
        [mu], delta=delta, value_discretization_interval=value_discretization_interval
    )


def pld_delta(mu: float, epsilon: float | np.ndarray) -> float | np.ndarray:
    """delta(eps) of a mu-GDP release as the hockey-stick divergence of dp-accounting's analytic
    GaussianPrivacyLoss (sensitivity 1, standard deviation 1/mu; no discretisation)."""
    loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=1.0 / _check_mu(mu))
    eps = check_profile_epsilon(epsilon)
    out = np.asarray(loss.get_delta_for_epsilon(eps.ravel()), dtype=np.float64).reshape(eps.shape)
    return float(out) if out.ndim == 0 else out
