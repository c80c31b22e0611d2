"""Round schedules (docs/theory.md §13): which private rows each round reads, the public weight
N_t of its quadratic, the noise multiplier z of its Gaussian, the seed of its subspace, and the
privacy cost of the whole run as a dp-accounting DpEvent.

Round t releases w_t with N_t lam L^T w_t = -sum_{i in B_t} u_i + xi_t, where u_i = L^-1 gh_i has
norm at most b (the per-example dual-norm bound) and xi_t ~ Normal(0, (z b)^2 I): a Gaussian
mechanism on the whitened clipped sum with noise multiplier z, i.e. inverse temperature
beta_t = N_t lam / (z b)^2. A schedule fixes B_t, N_t and z:

* ``Sequential(T)``: every round reads all records with N_t = N; each round is mu_t = s/z GDP
  with mu_t = mu / sqrt(T), so the T adaptive rounds are mu-GDP (Dong, Roth & Su 2022, Cor 3.3).
  Pure mode splits epsilon evenly.
* ``Partitioned(T, epochs=E)``: one epoch cuts the records into T public, contiguous, disjoint
  chunks, N_t = the chunk's size; a record is read by one round per epoch, so E epochs are
  sqrt(E) s / z GDP (parallel composition within an epoch). Replace-one, Gaussian-DP only.
* ``Poisson(q, T)``: round t reads each record independently with probability q, drawn from
  the operating system's CSPRNG (never released, never seeded from the data; a user seed only
  with the explicit reproducibility switch); N_t = q N is the public EXPECTED size, never the
  realised one; z is calibrated for (epsilon, delta) by dp-accounting's PLD accountant with
  the routine DP-SGD uses (qem.privacy.calibration).

A ``Plan`` is a schedule calibrated to a budget: it yields the rounds and describes what any
prefix of them cost. Everything here is numpy and dp-accounting; nothing knows about models.
"""

from __future__ import annotations

import inspect
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting import dp_event

from qem.checks import check_count
from qem.errors import InvalidParameterError
from qem.privacy.calibration import calibrate_noise_multiplier, neighboring_relation
from qem.privacy.gdp import calibrate_gdp_mu, warn_large_delta
from qem.privacy.sensitivity import Adjacency


@dataclass(frozen=True)
class Budget:
    """The target guarantee: (epsilon, delta) for ``adjacency``; ``delta`` is None in pure mode."""

    epsilon: float
    delta: float | None
    mode: str
    adjacency: Adjacency


@dataclass(frozen=True)
class Round:
    """One round of a plan.

    ``rows`` are the private rows it reads (None: all of them); for a Poisson round they are a
    private random draw and must never be released. ``N`` is the public weight of the round's
    quadratic, ``noise_multiplier`` z (Gaussian-DP) or ``epsilon`` (pure mode) its privacy
    parameter, ``subspace_draw`` the index of the subspace it uses (its seed is the run's
    subspace seed plus this index).
    """

    index: int
    epoch: int
    rows: np.ndarray | None
    N: float
    noise_multiplier: float | None
    epsilon: float | None
    subspace_draw: int


class Schedule(ABC):
    """A kind of round schedule with its public parameters (see the module docstring).

    ``resample_every``: draw a new public subspace every that many rounds (None: one subspace
    for the whole run). The seeds are public and fixed before any private data is read.
    """

    kind: str = "abstract"
    modes: tuple[str, ...] = ("gdp",)
    adjacencies: tuple[Adjacency, ...] = (Adjacency.REPLACE_ONE, Adjacency.ADD_REMOVE)

    def __init__(self, rounds: int, *, resample_every: int | None = None) -> None:
        self.rounds = check_count("rounds", rounds)
        self.resample_every = (
            None if resample_every is None else check_count("resample_every", resample_every)
        )

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

    def subspace_draw(self, index: int) -> int:
        """Index of the subspace that round ``index`` uses."""
        return 0 if self.resample_every is None else index // self.resample_every

    def plan(self, budget: Budget, n: int, N: float, seed: int | None = None) -> Plan:
        """This schedule calibrated to ``budget`` for ``n`` private records and public weight N
        (the one place where qem calibrates a run; it warns when delta >= 1/N).

        ``seed`` (the reproducibility switch) seeds the Poisson inclusion draws; None draws
        them from the operating system's CSPRNG."""
        self.check(budget.mode, budget.adjacency)
        if budget.mode == "gdp":
            warn_large_delta(budget.delta, N)
        return self._plan(budget, n, N, seed)

    @abstractmethod
    def _plan(self, budget: Budget, n: int, N: float, seed: int | None) -> Plan:
        """The calibrated plan (mode and adjacency already checked)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({fields})"

    def describe(self) -> dict:
        """The schedule's public parameters."""
        return {
            "kind": self.kind,
            "rounds": self.total_rounds,
            "resample_every": self.resample_every,
        }


class Plan(ABC):
    """A schedule calibrated to a budget: its rounds and the DpEvent of any prefix of them."""

    def __init__(self, schedule: Schedule, budget: Budget, n: int, N: float) -> None:
        self.schedule, self.budget, self.n, self.N = schedule, budget, n, N

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


class _UniformPlan(Plan):
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
        N: float,
        *,
        round_mu: float | None,
        round_epsilon: float | None,
    ) -> None:
        super().__init__(schedule, budget, n, N)
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


class Sequential(Schedule):
    """T rounds, each on all the private records (docs/theory.md §8)."""

    kind = "sequential"
    modes = ("gdp", "pure")

    def _plan(self, budget: Budget, n: int, N: float, seed: int | None) -> Plan:
        T = self.rounds
        if budget.mode == "gdp":
            mu = calibrate_gdp_mu(budget.epsilon, budget.delta)
            return _SequentialPlan(
                self, budget, n, N, round_mu=mu / math.sqrt(T), round_epsilon=None
            )
        return _SequentialPlan(self, budget, n, N, round_mu=None, round_epsilon=budget.epsilon / T)


class _SequentialPlan(_UniformPlan):
    def rounds(self, shard: range | None = None) -> Iterator[Round]:
        for t in range(self.schedule.rounds):
            yield Round(
                index=t,
                epoch=0,
                rows=None if shard is None else np.arange(shard.start, shard.stop),
                N=self.N,
                noise_multiplier=self.noise_multiplier,
                epsilon=self.round_epsilon,
                subspace_draw=self.schedule.subspace_draw(t),
            )


class Partitioned(Schedule):
    """E epochs of T disjoint chunks (docs/theory.md §8, parallel composition)."""

    kind = "partitioned"
    adjacencies = (Adjacency.REPLACE_ONE,)

    def __init__(self, rounds: int, *, epochs: int = 1, resample_every: int | None = None) -> None:
        super().__init__(rounds, resample_every=resample_every)
        self.epochs = check_count("epochs", epochs)

    @property
    def total_rounds(self) -> int:
        return self.rounds * self.epochs

    def _adjacency_reason(self) -> str:
        return "adding or removing one record would shift every later chunk."

    def _plan(self, budget: Budget, n: int, N: float, seed: int | None) -> Plan:
        if n != N or self.rounds > n:
            raise InvalidParameterError(
                f"a partitioned schedule splits the {n} private records into {self.rounds} "
                "chunks, each with N = its own size; do not pass N, and use at most one chunk "
                "per record."
            )
        mu = calibrate_gdp_mu(budget.epsilon, budget.delta)
        return _PartitionedPlan(
            self, budget, n, N, round_mu=mu / math.sqrt(self.epochs), round_epsilon=None
        )

    def describe(self) -> dict:
        return {**super().describe(), "chunks": self.rounds, "epochs": self.epochs}


class _PartitionedPlan(_UniformPlan):
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
                    subspace_draw=self.schedule.subspace_draw(index),
                )

    def releases_per_record(self, completed: int) -> int:
        # Within an epoch every record is in one chunk: an epoch costs one round (parallel
        # composition); a started epoch costs as much as a finished one.
        return math.ceil(completed / self.schedule.rounds)


class Poisson(Schedule):
    """T rounds, each on a Poisson sample of rate q (docs/theory.md §13).

    Give the rate q, or ``expected_batch`` B: then q = min(1, B / N) with N the public size, so
    one configuration means "about B records per round" on datasets of any size."""

    kind = "poisson"

    def __init__(
        self,
        sampling_rate: float | None = None,
        rounds: int = 1,
        *,
        expected_batch: float | None = None,
        resample_every: int | None = None,
    ) -> None:
        super().__init__(rounds, resample_every=resample_every)
        if (sampling_rate is None) == (expected_batch is None):
            raise InvalidParameterError(
                "a Poisson schedule needs exactly one of sampling_rate (q) and expected_batch."
            )
        if sampling_rate is not None:
            q = float(sampling_rate)
            if not (math.isfinite(q) and 0.0 < q <= 1.0):
                raise InvalidParameterError(
                    f"the Poisson sampling rate q must lie in (0, 1], got {sampling_rate!r}."
                )
        else:
            q = None
            check_count("expected_batch", expected_batch)
        self.sampling_rate, self.expected_batch = q, expected_batch

    def rate(self, N: float) -> float:
        """q for a public size N."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        return min(1.0, self.expected_batch / N)

    def _plan(self, budget: Budget, n: int, N: float, seed: int | None) -> Plan:
        q = self.rate(N)
        z = calibrate_noise_multiplier(
            budget.epsilon, budget.delta, q, self.rounds, budget.adjacency
        )
        return _PoissonPlan(self, budget, n, N, q, z, seed)

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
        N: float,
        q: float,
        z: float,
        seed: int | None,
    ) -> None:
        super().__init__(schedule, budget, n, N)
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
                rows=start + np.flatnonzero(inclusion_mask(self.n, q, self._rng, shard)),
                N=q * self.N,
                noise_multiplier=self._z,
                epsilon=None,
                subspace_draw=self.schedule.subspace_draw(t),
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


def inclusion_mask(
    n: int, q: float, rng: np.random.Generator | None = None, rows: range | None = None
) -> np.ndarray:
    """Independent Bernoulli(q) inclusions of the n rows, or of ``rows`` only (one rank's
    shard, qem.distributed): from 64-bit words of the operating system's CSPRNG
    (``os.urandom``, one word per row drawn; P(include) = floor(q 2^64) / 2^64), or from
    ``rng`` when the user asked for reproducibility. A shard's seeded draws are the ones a
    draw over all n rows gives those rows: the generator jumps over the other rows (PCG64
    ``advance``; one 64-bit output per float64 uniform) and ends where a full draw would."""
    rows = range(n) if rows is None else rows
    if rng is not None:
        if rows == range(n):
            return rng.random(n) < q
        jumper = np.random.Generator(type(rng.bit_generator)())
        jumper.bit_generator.state = rng.bit_generator.state
        jumper.bit_generator.advance(rows.start)
        rng.bit_generator.advance(n)
        return jumper.random(len(rows)) < q
    if q >= 1.0:
        return np.ones(len(rows), dtype=bool)
    words = np.frombuffer(os.urandom(8 * len(rows)), dtype=np.uint64)
    return words < np.uint64(math.floor(q * 2.0**64))


def sequential(rounds: int = 1, *, resample_subspace: bool = False) -> Sequential:
    """T rounds on all the records (a new subspace every round with ``resample_subspace``)."""
    return Sequential(rounds, resample_every=1 if resample_subspace else None)


def partitioned(rounds: int, *, epochs: int = 1, resample_subspace: bool = True) -> Partitioned:
    """E epochs of T disjoint chunks (a new subspace every round by default)."""
    return Partitioned(rounds, epochs=epochs, resample_every=1 if resample_subspace else None)


def poisson(
    sampling_rate: float | None = None,
    rounds: int = 1,
    *,
    expected_batch: float | None = None,
    resample_every: int | None = 1,
) -> Poisson:
    """T rounds on Poisson samples of rate q, or of about ``expected_batch`` records (a new
    subspace every ``resample_every`` rounds)."""
    return Poisson(
        sampling_rate, rounds, expected_batch=expected_batch, resample_every=resample_every
    )


SCHEDULES: dict[str, type[Schedule]] = {cls.kind: cls for cls in (Sequential, Partitioned, Poisson)}


def make_schedule(spec: Schedule | dict) -> Schedule:
    """A schedule from its JSON form, e.g. {"kind": "poisson", "sampling_rate": 0.02,
    "rounds": 50, "resample_every": 1} (configs and the command line), or the schedule
    itself."""
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, dict) or spec.get("kind") not in SCHEDULES:
        raise InvalidParameterError(
            f"a schedule is one of {sorted(SCHEDULES)} given as {{'kind': ..., parameters}}, "
            f"got {spec!r}."
        )
    cls = SCHEDULES[spec["kind"]]
    parameters = {k: v for k, v in spec.items() if k != "kind"}
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        raise InvalidParameterError(
            f"the {spec['kind']} schedule takes no parameters {unknown}; it accepts {accepted}."
        )
    return cls(**parameters)
