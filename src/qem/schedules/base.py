"""What every round schedule is (docs/theory.md §13): a ``Schedule`` says which private rows each
round reads, the public weight N_t of its quadratic and the noise multiplier z of its Gaussian;
calibrated to a ``Budget`` it becomes a ``Plan``, which yields the rounds and describes what any
prefix of them cost as a dp-accounting DpEvent. Nothing here knows about models or subspaces:
when to draw a new subspace is the public side's decision (qem.public.side).

Round t releases w_t with N_t lam L^T w_t = -sum_{i in B_t} u_i + xi_t, where u_i = L^-1 gh_i has
norm at most b (the per-example dual-norm bound) and xi_t ~ Normal(0, (z b)^2 I): a Gaussian
mechanism on the whitened clipped sum with noise multiplier z, i.e. inverse temperature
beta_t = N_t lam / (z b)^2.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting import dp_event

from qem.checks import check_count
from qem.errors import InvalidParameterError
from qem.privacy.budget import Budget
from qem.privacy.gdp import warn_large_delta
from qem.privacy.pld import neighboring_relation
from qem.privacy.sensitivity import Adjacency


@dataclass(frozen=True)
class Round:
    """One round of a plan.

    ``rows`` are the private rows it reads (None: all of them); for a Poisson round they are a
    private random draw and must never be released. ``N`` is the public weight of the round's
    quadratic, ``noise_multiplier`` z (Gaussian-DP) or ``epsilon`` (pure mode) its privacy
    parameter.
    """

    index: int
    epoch: int
    rows: np.ndarray | None
    N: float
    noise_multiplier: float | None
    epsilon: float | None


class Schedule(ABC):
    """A kind of round schedule with its public parameters (see the module docstring).

    ``same_records_every_round``: whether every round reads the same records (then one public
    subspace may serve the whole run; the public side decides). ``private_round_sizes``: whether
    the number of records a round reads is private (Poisson), so that nothing may show it."""

    kind: str = "abstract"
    modes: tuple[str, ...] = ("gdp",)
    adjacencies: tuple[Adjacency, ...] = (Adjacency.REPLACE_ONE, Adjacency.ADD_REMOVE)
    same_records_every_round: bool = False
    private_round_sizes: bool = False

    def __init__(self, rounds: int = 1) -> None:
        self.rounds = check_count("rounds", rounds)

    @property
    def total_rounds(self) -> int:
        """Number of rounds the schedule runs."""
        return self.rounds

    def check(self, mode: str, adjacency: Adjacency) -> None:
        """Refuse a mode or adjacency this schedule cannot account for."""
        if mode not in self.modes:
            raise InvalidParameterError(
                f"the {self.kind} schedule supports mode {' or '.join(self.modes)}, not {mode!r}."
            )
        if adjacency not in self.adjacencies:
            supported = ", ".join(a.value for a in self.adjacencies)
            raise InvalidParameterError(
                f"the {self.kind} schedule accounts for {supported} neighbours only, not "
                f"{adjacency.value}: {self._adjacency_reason()}"
            )

    def _adjacency_reason(self) -> str:
        return ""

    def plan(self, budget: Budget, n: int, *, seed: int | None = None) -> Plan:
        """This schedule calibrated to ``budget`` for ``n`` private records (the one place where
        qem calibrates a run; it warns when delta >= 1/N). The budget's N is the public weight
        (``Budget.for_records``: n under replace-one unless declared).

        ``seed`` (the reproducibility switch) seeds the Poisson inclusion draws; None draws
        them from the operating system's CSPRNG."""
        self.check(budget.mode, budget.adjacency)
        budget = budget.for_records(n)
        if budget.mode == "gdp":
            warn_large_delta(budget.delta, budget.N)
        return self._plan(budget, n, seed)

    @abstractmethod
    def _plan(self, budget: Budget, n: int, seed: int | None) -> Plan:
        """The calibrated plan (N set, mode and adjacency already checked)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({fields})"

    def describe(self) -> dict:
        """The schedule's public parameters."""
        return {"kind": self.kind, "rounds": self.total_rounds}


class Plan(ABC):
    """A schedule calibrated to a budget (with its N): its rounds and the DpEvent of any prefix
    of them."""

    def __init__(self, schedule: Schedule, budget: Budget, n: int) -> None:
        self.schedule, self.budget, self.n = schedule, budget, n

    @property
    def N(self) -> float:
        """The public weight of the whole run's quadratic (the budget's N)."""
        return self.budget.N

    @abstractmethod
    def rounds(self, shard: range | None = None) -> Iterator[Round]:
        """The rounds, in order (Poisson rows are drawn as each round is reached). With a
        ``shard`` (one rank's rows, qem.distributed) each round's ``rows`` are those of its rows
        that lie in the shard, and a Poisson round draws the inclusions of the shard's rows
        only; N_t and the privacy parameters are the whole round's."""

    @abstractmethod
    def dp_event(self, completed: int) -> dp_event.DpEvent:
        """What the first ``completed`` rounds release, as a dp-accounting event."""

    @property
    @abstractmethod
    def relation(self) -> dp_accounting.NeighboringRelation:
        """The neighbouring relation under which ``dp_event`` is to be accounted."""

    def mu_after(self, completed: int) -> float | None:
        """The composed GDP parameter of the first ``completed`` rounds (None when the run is
        not a GDP statement: Poisson rounds, pure mode)."""
        return None

    def epsilon_after(self, completed: int) -> float | None:
        """Pure mode: the epsilon of the first ``completed`` rounds (None otherwise)."""
        return None

    @property
    def mu(self) -> float | None:
        """The composed GDP parameter of the whole run."""
        return self.mu_after(self.schedule.total_rounds)

    @property
    def noise_multiplier(self) -> float | None:
        """z of every round (None in pure mode)."""
        return None

    def describe(self) -> dict:
        """Public description: the schedule, the calibrated z, the relation."""
        return {
            **self.schedule.describe(),
            "noise_multiplier": self.noise_multiplier,
            "neighboring_relation": self.relation.name,
        }


class UniformPlan(Plan):
    """Rounds with one privacy parameter each. GDP with mu_round = s / z: each round is a
    GaussianDpEvent(z) under the adjacency's own relation (dp-accounting's PLD accountant
    doubles the shift under REPLACE_ONE, which is the s = 2), the convention of the Poisson
    schedule and of DP-SGD, so that every qem and DP-SGD event of one adjacency composes under
    one relation (docs/theory.md §13, deviation (f)). Pure epsilon per round: each round is
    binary randomized response with likelihood ratio e^eps (noise parameter 2 / (1 + e^eps)),
    whose privacy profile
    dominates that of every eps-DP mechanism (Kairouz, Oh & Viswanath 2015); dp-accounting
    accounts it under REPLACE_ONE whatever qem's adjacency. The reported epsilon of pure rounds
    is their sum (basic composition)."""

    def __init__(
        self,
        schedule: Schedule,
        budget: Budget,
        n: int,
        *,
        round_mu: float | None,
        round_epsilon: float | None,
    ) -> None:
        super().__init__(schedule, budget, n)
        self.round_mu, self.round_epsilon = round_mu, round_epsilon

    @property
    def relation(self) -> dp_accounting.NeighboringRelation:
        if self.round_mu is None:  # dp-accounting accounts randomized response as REPLACE_ONE
            return dp_accounting.NeighboringRelation.REPLACE_ONE
        return neighboring_relation(self.budget.adjacency)

    def releases_per_record(self, completed: int) -> int:
        """How many of the first ``completed`` rounds read any one record (at most)."""
        return completed

    def mu_after(self, completed: int) -> float | None:
        if self.round_mu is None:
            return None
        return self.round_mu * math.sqrt(self.releases_per_record(completed))

    def epsilon_after(self, completed: int) -> float | None:
        """Pure mode: the epsilon of the first ``completed`` rounds (basic composition)."""
        if self.round_epsilon is None:
            return None
        return self.round_epsilon * self.releases_per_record(completed)

    @property
    def noise_multiplier(self) -> float | None:
        if self.round_mu is None:
            return None
        return self.budget.adjacency.multiplier / self.round_mu

    def dp_event(self, completed: int) -> dp_event.DpEvent:
        releases = self.releases_per_record(completed)
        if releases == 0:
            return dp_event.NoOpDpEvent()
        if self.round_mu is not None:
            one = dp_event.GaussianDpEvent(self.noise_multiplier)
        else:  # binary randomized response with ratio e^eps dominates every eps-DP mechanism
            p = 2.0 / (1.0 + math.exp(self.round_epsilon))
            one = dp_event.RandomizedResponseDpEvent(noise_parameter=p, num_buckets=2)
        return dp_event.SelfComposedDpEvent(one, releases)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "round_mu": self.round_mu,
            "round_epsilon": self.round_epsilon,
        }
