"""``Poisson(q, T)`` (docs/theory.md §13): round t reads each record independently with
probability q, drawn from the operating system's CSPRNG (never released, never seeded from the
data; a user seed only with the explicit reproducibility switch, qem.schedules.sampling);
N_t = q N is the public EXPECTED size, never the realised one; z is calibrated for
(epsilon, delta) by dp-accounting's PLD accountant with the routine DP-SGD uses
(qem.privacy.calibration)."""

from __future__ import annotations

from collections.abc import Iterator

import dp_accounting
import numpy as np
from dp_accounting import dp_event

from qem.checks import check_count, check_in_interval
from qem.errors import InvalidParameterError
from qem.privacy.budget import Budget
from qem.privacy.calibration import calibrate_noise_multiplier
from qem.privacy.pld import neighboring_relation
from qem.schedules import sampling
from qem.schedules.base import Plan, Round, Schedule


class Poisson(Schedule):
    """T rounds, each on a Poisson sample of rate q (docs/theory.md §13).

    Give the rate q, or ``expected_batch`` B: then q = min(1, B / N) with N the public size, so
    one configuration means "about B records per round" on datasets of any size."""

    kind = "poisson"
    private_round_sizes = True

    def __init__(
        self,
        sampling_rate: float | None = None,
        rounds: int = 1,
        *,
        expected_batch: float | None = None,
    ) -> None:
        super().__init__(rounds)
        if (sampling_rate is None) == (expected_batch is None):
            raise InvalidParameterError(
                "a Poisson schedule needs exactly one of sampling_rate (q) and expected_batch."
            )
        if sampling_rate is not None:
            q = check_in_interval("the Poisson sampling rate q", sampling_rate, 0, 1, closed="high")
        else:
            q = None
            check_count("expected_batch", expected_batch)
        self.sampling_rate, self.expected_batch = q, expected_batch

    def rate(self, N: float) -> float:
        """q for a public size N."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        return min(1.0, self.expected_batch / N)

    def _plan(self, budget: Budget, n: int, seed: int | None) -> Plan:
        q = self.rate(budget.N)
        z = calibrate_noise_multiplier(
            budget.epsilon, budget.delta, q, self.rounds, adjacency=budget.adjacency
        )
        return _PoissonPlan(self, budget, n, q, z, seed)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "sampling_rate": self.sampling_rate,
            "expected_batch": self.expected_batch,
        }


class _PoissonPlan(Plan):
    def __init__(
        self,
        schedule: Poisson,
        budget: Budget,
        n: int,
        q: float,
        z: float,
        seed: int | None,
    ) -> None:
        super().__init__(schedule, budget, n)
        self.sampling_rate, self._z = q, z
        self._rng = None if seed is None else np.random.default_rng(seed)

    @property
    def noise_multiplier(self) -> float:
        return self._z

    @property
    def relation(self) -> dp_accounting.NeighboringRelation:
        return neighboring_relation(self.budget.adjacency)

    def rounds(self, shard: range | None = None) -> Iterator[Round]:
        q = self.sampling_rate
        start = 0 if shard is None else shard.start
        for t in range(self.schedule.rounds):
            yield Round(
                index=t,
                epoch=0,
                rows=start + np.flatnonzero(sampling.inclusion_mask(self.n, q, self._rng, shard)),
                N=q * self.N,
                noise_multiplier=self._z,
                epsilon=None,
            )

    def dp_event(self, completed: int) -> dp_event.DpEvent:
        if completed == 0:
            return dp_event.NoOpDpEvent()
        sampled = dp_event.PoissonSampledDpEvent(
            self.sampling_rate, dp_event.GaussianDpEvent(self._z)
        )
        return dp_event.SelfComposedDpEvent(sampled, completed)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "sampling_rate": self.sampling_rate,
            "sampling": "user_seed" if self._rng is not None else "os_csprng",
        }
