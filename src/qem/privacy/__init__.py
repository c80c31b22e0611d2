"""Privacy accounting of qem releases: numpy/scipy only, no models, no data.

The names from :mod:`qem.privacy.accounting` (dp-accounting interoperability) are loaded on
first use, because importing dp-accounting takes about two seconds.
"""

from importlib import import_module
from typing import Any

from qem.checks import check_delta, check_epsilon
from qem.privacy.gdp import (
    calibrate_gdp_mu,
    compose_gdp,
    gdp_delta,
    gdp_epsilon,
    gdp_log_delta,
    gdp_renyi,
)
from qem.privacy.pure import (
    MIN_ACCEPTANCE,
    acceptance_at_radius,
    check_acceptance,
    choose_radius,
    pure_beta,
    utility_sensitivity,
    worst_case_acceptance,
)
from qem.privacy.sensitivity import Adjacency, ClipNorm, Sensitivity, gdp_beta, gdp_mu

_ACCOUNTING = ("compose_with_dp_events", "gdp_dp_event", "pld_delta", "pld_epsilon")


def __getattr__(name: str) -> Any:
    if name in _ACCOUNTING:
        return getattr(import_module("qem.privacy.accounting"), name)
    raise AttributeError(f"module 'qem.privacy' has no attribute {name!r}")


__all__ = [
    "MIN_ACCEPTANCE",
    "Adjacency",
    "ClipNorm",
    "Sensitivity",
    "acceptance_at_radius",
    "calibrate_gdp_mu",
    "check_acceptance",
    "check_delta",
    "check_epsilon",
    "choose_radius",
    "compose_gdp",
    "compose_with_dp_events",
    "gdp_beta",
    "gdp_delta",
    "gdp_dp_event",
    "gdp_epsilon",
    "gdp_log_delta",
    "gdp_mu",
    "gdp_renyi",
    "pld_delta",
    "pld_epsilon",
    "pure_beta",
    "utility_sensitivity",
    "worst_case_acceptance",
]
