"""``Partitioned(T, epochs=E)`` (docs/theory.md §8): one epoch cuts the records into T public,
contiguous, disjoint chunks, N_t = the chunk's size; a record is read by one round per epoch, so
E epochs are sqrt(E) s / z GDP (parallel composition within an epoch). Replace-one, Gaussian-DP
only."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from qem.checks import check_count
from qem.errors import InvalidParameterError
from qem.privacy.budget import Budget
from qem.privacy.gdp import calibrate_gdp_mu
from qem.privacy.sensitivity import Adjacency
from qem.schedules.base import Plan, Round, Schedule, UniformPlan


class Partitioned(Schedule):
    """E epochs of T disjoint chunks (docs/theory.md §8, parallel composition)."""

    kind = "partitioned"
    adjacencies = (Adjacency.REPLACE_ONE,)

    def __init__(self, rounds: int, *, epochs: int = 1) -> None:
        super().__init__(rounds)
        self.epochs = check_count("epochs", epochs)

    @property
    def total_rounds(self) -> int:
        return self.rounds * self.epochs

    def _adjacency_reason(self) -> str:
        return "adding or removing one record would shift every later chunk."

    def _plan(self, budget: Budget, n: int, seed: int | None) -> Plan:
        if n != budget.N or self.rounds > n:
            raise InvalidParameterError(
                f"a partitioned schedule splits the {n} private records into {self.rounds} "
                "chunks, each with N = its own size; do not pass N, and use at most one chunk "
                "per record."
            )
        mu = calibrate_gdp_mu(budget.epsilon, budget.delta)
        return _PartitionedPlan(
            self, budget, n, round_mu=mu / math.sqrt(self.epochs), round_epsilon=None
        )

    def describe(self) -> dict:
        return {**super().describe(), "chunks": self.rounds, "epochs": self.epochs}


class _PartitionedPlan(UniformPlan):
    def rounds(self, shard: range | None = None) -> Iterator[Round]:
        T, n = self.schedule.rounds, self.n
        shard = range(n) if shard is None else shard
        for epoch in range(self.schedule.epochs):
            for t in range(T):
                start, stop = t * n // T, (t + 1) * n // T
                index = epoch * T + t
                yield Round(
                    index=index,
                    epoch=epoch,
                    rows=np.arange(max(start, shard.start), min(stop, shard.stop)),
                    N=float(stop - start),
                    noise_multiplier=self.noise_multiplier,
                    epsilon=None,
                )

    def releases_per_record(self, completed: int) -> int:
        # Within an epoch every record is in one chunk: an epoch costs one round (parallel
        # composition); a started epoch costs as much as a finished one.
        return math.ceil(completed / self.schedule.rounds)
