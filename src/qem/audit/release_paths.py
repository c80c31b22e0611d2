"""Where the audits touch qem's engine: every import of it by qem.audit is in this module, so
that a change of the engine's layout is a change of this file alone.

* ``capture_run``: one real ``qem.fine_tune`` run, with the mechanism's draw intercepted. Each
  round's calibrated mechanism (``QuadraticExponentialMechanism``: the real public side, private
  pass, calibration and noise source built it) and its clipped gradient sum are recorded, and
  the engine continues with a release the caller chooses (``replay``) or its own draw. The
  audits then draw many releases per round from the recorded mechanism in one batch
  (``RoundMechanism.draw``): everything public is the same for all of them.
* ``force_all_rows``: Poisson rounds read every row (the audits mix "sampled" and "not sampled"
  themselves, with the schedule's own inclusion sampler, ``poisson_inclusions``).
* ``SEEDED_BUGS`` and ``scaled_noise``: audit-only faults (the noise std scaled, the replace-one
  factor 2 dropped, partitioned chunks that overlap), to show that an audit flags them. None of
  them is reachable from fine_tune's API; each patches the engine for the duration of a ``with``
  block only (not thread-safe: a patch is process-wide while it lasts).
* ``per_example_clipped`` / ``private_sum``: the private pass of a recorded round on other data
  (the one-run audit scores its canaries with them); ``clipped_along``: gradients of chosen
  directions clipped by the engine's clipping, and ``capture_run(..., added_gradients=...)``
  adds them to a round's clipped sum (the one-run audit's gradient canaries).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import linalg
from torch import nn

import qem.finetune.engine
import qem.schedules.sampling
from qem.data import DataLike, as_dataset
from qem.finetune import FineTuneResult, ZeroStepWarning, fine_tune
from qem.mechanism import NoiseSource, QuadraticExponentialMechanism
from qem.mechanism.clipping import clip_gradients
from qem.privacy.sensitivity import Adjacency
from qem.statistics import private_gradient_batches, private_gradient_sum

__all__ = [
    "SEEDED_BUGS",
    "Capture",
    "FineTuneResult",
    "RoundMechanism",
    "capture_run",
    "clipped_along",
    "fine_tune",
    "per_example_clipped",
    "poisson_inclusions",
    "private_sum",
    "scaled_noise",
    "seeded_bug",
]


@dataclass(frozen=True)
class RoundMechanism:
    """Round t's Gaussian release as the engine built it: w ~ Normal(mean(S), Sigma) with
    Sigma^-1 = W^T W, W = sqrt(beta N lam) L^T (A = L L^T), drawn by the engine's own sampler;
    ``per_example_bound`` b is the largest dual norm of one clipped gradient (C, or
    C / sqrt(lambda_min(A)) under Euclidean clipping), ``multiplier`` s of the adjacency."""

    mechanism: QuadraticExponentialMechanism = field(repr=False)

    def draw(self, gradient_sum: np.ndarray, n: int) -> np.ndarray:
        """n releases (n, k) for the clipped gradient sum S, from the mechanism's noise source."""
        return self.mechanism.sample(gradient_sum, size=n)

    def mean(self, gradient_sum: np.ndarray) -> np.ndarray:
        """m = -(N lam A)^-1 S."""
        return self.mechanism.mean(gradient_sum)

    @property
    def whitener(self) -> np.ndarray:
        m = self.mechanism
        return np.sqrt(m.beta * m.N * m.lam) * m.cholesky.T

    @property
    def cholesky(self) -> np.ndarray:
        return self.mechanism.cholesky

    @property
    def beta(self) -> float:
        return self.mechanism.beta

    @property
    def per_example_bound(self) -> float:
        return self.mechanism.sensitivity.per_example_dual_bound

    @property
    def multiplier(self) -> int:
        return self.mechanism.sensitivity.adjacency.multiplier

    def dual_norm(self, gradient_sum: np.ndarray) -> float:
        """||S||_{A^-1} = ||L^-1 S||."""
        return float(
            np.linalg.norm(linalg.solve_triangular(self.cholesky, gradient_sum, lower=True))
        )


@dataclass
class Capture:
    """One captured run: per round the mechanism, the clipped gradient sum it was given, the
    private pass's context (``passes``: model at theta_t, subspace, clip norm, ... as keyword
    arguments of ``private_sum``) and the clipped sum that pass itself computed (``pass_sums``:
    without ``added_gradients``); the releases the engine continued with; the run's result."""

    mechanisms: list[RoundMechanism] = field(default_factory=list)
    gradient_sums: list[np.ndarray] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    pass_sums: list[np.ndarray] = field(default_factory=list)
    releases: list[np.ndarray] = field(default_factory=list)
    result: FineTuneResult | None = None


def capture_run(
    model: nn.Module,
    loss_fn: Callable,
    public: DataLike,
    private: DataLike,
    config: dict[str, Any],
    *,
    replay: list[np.ndarray] | None = None,
    zero_releases: bool = False,
    added_gradients: Callable[[dict[str, Any], int], tuple[np.ndarray, int]] | None = None,
) -> Capture:
    """Run ``fine_tune(model, loss_fn, public, private, **config)`` once, recording each round
    (see ``Capture``); round t continues with ``replay[t]`` when given (a public release of
    another run: the rounds after it then see the same public state), with w_t = 0 under
    ``zero_releases`` (every round then sees theta0), else with the engine's own draw. The
    ZeroStepWarning a zero release causes is silenced. ``added_gradients(context, t)`` (audit
    only) returns a sum of clipped gradients and their count, added to round t's clipped sum
    and count as if that many more records had been read (``context``: ``Capture.passes[t]``)."""
    capture = Capture()
    draw = QuadraticExponentialMechanism.sample
    private_pass = qem.finetune.engine.private_gradient_sum

    def sample(self, gradient_sum, size=None):
        if size is not None:
            return draw(self, gradient_sum, size)
        t = len(capture.mechanisms)
        capture.mechanisms.append(RoundMechanism(self))
        capture.gradient_sums.append(np.array(gradient_sum, dtype=np.float64))
        if zero_releases:
            w = np.zeros(self.k)
        elif replay is not None:
            w = np.array(replay[t], dtype=np.float64)
        else:
            w = draw(self, gradient_sum)
        capture.releases.append(w)
        return w

    def recorded_pass(model, loss_fn, subspace, rows, **options):
        capture.passes.append(
            {"model": copy.deepcopy(model), "loss_fn": loss_fn, "subspace": subspace, **options}
        )
        statistics = private_pass(model, loss_fn, subspace, rows, **options)
        capture.pass_sums.append(np.array(statistics.gradient_sum, dtype=np.float64))
        if added_gradients is None:
            return statistics
        added, count = added_gradients(capture.passes[-1], len(capture.passes) - 1)
        return dataclasses.replace(
            statistics,
            gradient_sum=statistics.gradient_sum + added,
            count=statistics.count + count,
            clipped_count=statistics.clipped_count + count,
        )

    with (
        patched(QuadraticExponentialMechanism, "sample", sample),
        patched(qem.finetune.engine, "private_gradient_sum", recorded_pass),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", ZeroStepWarning)
        capture.result = fine_tune(model, loss_fn, public, private, progress=False, **config)
    return capture


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the duration of the block."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def force_all_rows() -> Iterator[None]:
    """Poisson rounds include every row while the block lasts."""
    with patched(
        qem.schedules.sampling,
        "inclusion_mask",
        lambda n, q, rng=None, rows=None: np.ones(n if rows is None else len(rows), dtype=bool),
    ):
        yield


def poisson_inclusions(size: tuple[int, int], q: float) -> np.ndarray:
    """Independent Bernoulli(q) inclusions of the given shape, from the schedule's own sampler
    (64-bit words of the operating system's CSPRNG)."""
    count = int(np.prod(size))
    return qem.schedules.sampling.inclusion_mask(count, q).reshape(size)


# -- seeded bugs (audit-only) -------------------------------------------------------------------


class ScaledNoise(NoiseSource):
    """Another source's normals times ``factor``: the mechanism's noise std scaled (a seeded
    bug for audits; never part of fine_tune's API)."""

    def __init__(self, inner: NoiseSource, factor: float) -> None:
        self.inner, self.factor = inner, float(factor)
        self.secure = inner.secure

    def standard_normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        return self.factor * self.inner.standard_normal(shape)

    def describe(self) -> dict:
        return {**self.inner.describe(), "seeded_bug": f"noise std x {self.factor:g}"}


@contextmanager
def scaled_noise(factor: float) -> Iterator[None]:
    """Every draw of the mechanism while the block lasts has its noise std times ``factor``
    (factor 1/4: the noise multiplier divided by 4)."""
    draw = QuadraticExponentialMechanism.sample

    def sample(self, gradient_sum, size=None):
        if not isinstance(self.noise, ScaledNoise):
            self.noise = ScaledNoise(self.noise, factor)
        return draw(self, gradient_sum, size)

    with patched(QuadraticExponentialMechanism, "sample", sample):
        yield


@contextmanager
def _dropped_replace_one_factor() -> Iterator[None]:
    """The sensitivity of replace-one taken as C instead of 2 C: noise half as large."""
    with patched(Adjacency, "multiplier", property(lambda self: 1)):
        yield


@contextmanager
def _overlapping_chunks() -> Iterator[None]:
    """Every round of a partitioned schedule reads every record (chunks that overlap), while
    the accountant still charges one round per epoch."""
    # qem.schedules re-exports the class Partitioned as ``partitioned``: import the module itself
    plan = importlib.import_module("qem.schedules.partitioned")._PartitionedPlan
    rounds = plan.rounds

    def every_row(self, shard=None):
        for executed in rounds(self, shard):
            rows = np.arange(self.n) if shard is None else np.arange(shard.start, shard.stop)
            yield dataclasses.replace(executed, rows=rows)

    with patched(plan, "rounds", every_row):
        yield


SEEDED_BUGS: dict[str, Callable[[], Any]] = {
    "sensitivity/2": _dropped_replace_one_factor,
    "overlapping_chunks": _overlapping_chunks,
}
"""Audit-only faults by name: replace-one's factor 2 dropped from the sensitivity (Gaussian-DP
paths calibrated by mu: sequential, partitioned; a Poisson round's noise z C does not use it),
partitioned chunks that overlap. The noise std scaled is ``scaled_noise``."""


@contextmanager
def seeded_bug(name: str | None) -> Iterator[None]:
    """The seeded bug ``name`` (a key of SEEDED_BUGS) for the duration of the block; None: none."""
    with ExitStack() as stack:
        if name is not None:
            stack.enter_context(SEEDED_BUGS[name]())
        yield


# -- the private pass of a recorded round on other data ----------------------------------------


def private_sum(data: DataLike, context: dict[str, Any]) -> np.ndarray:
    """The clipped gradient sum S of ``data`` by the engine's private pass in a recorded round's
    context (``Capture.passes[t]``), one process."""
    options = {**context, "all_reduce": None, "progress": False}
    model, loss_fn, subspace = options.pop("model"), options.pop("loss_fn"), options.pop("subspace")
    return private_gradient_sum(model, loss_fn, subspace, data, **options).gradient_sum


def per_example_clipped(data: DataLike, context: dict[str, Any]) -> np.ndarray:
    """gh_i (n, k) of every record of ``data`` in a recorded round's context: the engine's
    per-example gradients (its invalid-record policy included), clipped in the round's norm
    (qem.mechanism.clipping.clip_gradients), so that sum_i gh_i is ``private_sum(data, ...)``."""
    dataset = as_dataset(data, "canaries", addressable=True)
    rows = [
        clip_gradients(
            grads.numpy(), context["clip_norm"], context["clipping"], context["cholesky"]
        )[0]
        for grads, _invalid in private_gradient_batches(
            context["model"],
            context["loss_fn"],
            context["subspace"],
            dataset,
            batch_size=context["batch_size"],
            invalid=context["invalid_records"],
        )
    ]
    return np.concatenate(rows) if rows else np.zeros((0, context["subspace"].k))


def clipped_along(directions: np.ndarray, context: dict[str, Any]) -> np.ndarray:
    """Clipped gradients (n, k) whose whitened directions are the rows r_i of ``directions``:
    g_i = L r_i scaled far beyond the clip bound (A = L L^T of the recorded round's context;
    L = I without a Cholesky factor), then clipped by the engine's clip_gradients in the round's
    norm, so that each is a record of the largest influence a record can have: dual norm C
    (dual clipping) or Euclidean norm C, along L r_i either way."""
    r = np.asarray(directions, dtype=np.float64)
    cholesky = context["cholesky"]
    raw = r if cholesky is None else r @ cholesky.T
    smallest = np.minimum(np.linalg.norm(r, axis=1), np.linalg.norm(raw, axis=1))
    beyond = 1e3 * context["clip_norm"] / smallest  # both norms of raw rows >= 1e3 C
    clipped, _ = clip_gradients(
        raw * beyond[:, None], context["clip_norm"], context["clipping"], cholesky
    )
    return clipped
