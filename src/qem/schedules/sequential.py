"""``Sequential(T)`` (docs/theory.md §8): every round reads all records with N_t = N; each round
is mu_t = s/z GDP with mu_t = mu / sqrt(T), so the T adaptive rounds are mu-GDP (Dong, Roth & Su
2022, Cor 3.3). Pure mode splits epsilon evenly."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from qem.privacy.budget import Budget
from qem.privacy.gdp import calibrate_gdp_mu
from qem.schedules.base import Plan, Round, Schedule, UniformPlan


class Sequential(Schedule):
    """T rounds, each on all the private records (docs/theory.md §8)."""

    kind = "sequential"
    modes = ("gdp", "pure")
    same_records_every_round = True

    def _plan(self, budget: Budget, n: int, seed: int | None) -> Plan:
        T = self.rounds
        if budget.mode == "gdp":
            mu = calibrate_gdp_mu(budget.epsilon, budget.delta)
            return _SequentialPlan(self, budget, n, round_mu=mu / math.sqrt(T), round_epsilon=None)
        return _SequentialPlan(self, budget, n, round_mu=None, round_epsilon=budget.epsilon / T)


class _SequentialPlan(UniformPlan):
    def rounds(self, shard: range | None = None) -> Iterator[Round]:
        for t in range(self.schedule.rounds):
            yield Round(
                index=t,
                epoch=0,
                rows=None if shard is None else np.arange(shard.start, shard.stop),
                N=self.N,
                noise_multiplier=self.noise_multiplier,
                epsilon=self.round_epsilon,
            )
