"""dp-accounting's privacy-loss-distribution (PLD) accountant, built in one place: the
neighbouring relation of each of qem's adjacencies and the discretisation interval (connect-the-
dots, Doroshenko et al. 2022: the epsilon it reports is an upper bound at any interval), widened
for huge epsilons so that the privacy-loss grid stays bounded."""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from qem.checks import check_epsilon
from qem.privacy.sensitivity import Adjacency

PLD_DISCRETIZATION = 1e-3
"""value_discretization_interval of the PLD accountant: epsilon is an upper bound at any value;
1e-3 is within 0.01 of 1e-4 on MNIST-sized runs and about 5 times faster."""

MAX_PLD_POINTS = 2e6
"""Largest privacy-loss grid the accountant may build (about 30 MB). A huge epsilon (say 1e9)
would otherwise ask for terabytes; the interval is widened instead (still an upper bound)."""

RELATIONS = {
    Adjacency.ADD_REMOVE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    Adjacency.REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}
"""dp-accounting's neighbouring relation for each of qem's adjacencies."""


def neighboring_relation(adjacency: Adjacency | str) -> dp_accounting.NeighboringRelation:
    """dp-accounting's relation for ``adjacency``."""
    return RELATIONS[Adjacency(adjacency)]


def discretization_for(epsilon: float, base: float = PLD_DISCRETIZATION) -> float:
    """A PLD interval whose grid stays below MAX_PLD_POINTS for losses up to a few epsilon.

    The grid spans privacy losses up to about the epsilon of interest (times a margin), so it
    has about 10 epsilon / interval points; below epsilon = 200 this is ``base`` itself."""
    return max(base, 10.0 * check_epsilon(epsilon) / MAX_PLD_POINTS)


def pld_accountant(
    relation: dp_accounting.NeighboringRelation,
    *,
    epsilon: float | None = None,
    interval: float = PLD_DISCRETIZATION,
) -> PLDAccountant:
    """A fresh PLD accountant under ``relation`` with discretisation ``interval``, widened by
    ``discretization_for`` when the ``epsilon`` of interest is given."""
    if epsilon is not None:
        interval = discretization_for(epsilon, interval)
    return PLDAccountant(relation, value_discretization_interval=interval)
