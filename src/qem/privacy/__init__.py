"""Privacy accounting of qem releases: numpy/scipy only, no models, no data."""

from qem.privacy.gdp import (
    calibrate_gdp_mu,
    check_delta,
    check_epsilon,
    compose_gdp,
    gdp_delta,
    gdp_epsilon,
    gdp_log_delta,
    gdp_renyi,
)
from qem.privacy.sensitivity import Adjacency, ClipNorm, Sensitivity, gdp_beta, gdp_mu

__all__ = [
    "Adjacency",
    "ClipNorm",
    "Sensitivity",
    "calibrate_gdp_mu",
    "check_delta",
    "check_epsilon",
    "compose_gdp",
    "gdp_beta",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_log_delta",
    "gdp_mu",
    "gdp_renyi",
]
