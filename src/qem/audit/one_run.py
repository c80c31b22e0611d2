"""One-run audits of a real fine-tuning (docs/theory.md §17), after Steinke, Nasr & Jagielski
(2023, "Privacy Auditing with One (1) Training Run", arXiv:2305.08846).

m canaries, each included in the private data independently with probability 1/2 by a coin
from the operating system's CSPRNG (``secrets``), go into ONE run of ``qem.fine_tune``. From the
run's public releases the audit scores every canary, guesses "included" for the highest scores
and "excluded" for the lowest, and turns the number of correct guesses into an eps lower bound
at delta with its confidence (qem.audit.statistics.one_run_bound: a binomial tail, their
Theorem 3.1), set beside the claimed epsilon. Verdict FAIL when the bound exceeds the claim.

Adjacency: a canary is added or removed, so the claim the theorem tests is add/remove; the run
therefore uses ``adjacency="add_remove"`` with the declared, public N = (records without
canaries) + m/2, fixed before the coins are drawn (under replace-one qem's N would be the
realised size, a function of the coins).

Canaries and score (both chosen to make each canary's influence maximal and the canaries'
interference minimal, Steinke et al. §6):

* canaries (``Canaries``) move the release by the largest amount any record can, C in the
  whitened metric, and as nearly orthogonally to each other as possible. Gradient canaries
  (``GradientCanaries``, the MNIST default; white-box, Steinke et al. §7) are records whose
  clipped gradient in round t is the engine's clipping of L_t r_{i,t}, r_{i,t} a public random
  direction: their whitened shifts are nearly orthogonal whatever the model. Record canaries
  (``RecordCanaries``: MNIST images of uniform pixel noise with random labels; the synthetic
  task's records on their own input feature) go through the whole private pass, but images of
  noise have nearly collinear gradients, so on MNIST each inclusion's estimate has a large
  standard error and the test is weak (docs/theory.md §17 has the measured bounds);
* the scores come from the releases' likelihood: in whitened coordinates (Sigma_t^-1 =
  W_t^T W_t) round t's release is y_t = W_t (w_t - m_t(S_data,t)) = sum_i S_i x_{i,t} +
  Normal(0, I), with S_i the coin of canary i, x_{i,t} = W_t m_t(gh_{i,t}) the shift of its
  clipped gradient gh_{i,t} in round t's public context (theta_t, P_t, A_t, C_t), and S_data,t
  the clipped sum of the records without canaries (known to the auditor, who owns them, and
  independent of the coins, so the theorem allows it: it removes the data's interference, by
  far the largest term). The generalised least-squares estimate over all rounds at once,
  S_hat = (X^T X)^-1 X^T y, is S + Normal(0, (X^T X)^-1): unbiased whatever the other coins,
  so the canaries do not interfere either (on MNIST, images of noise have strongly correlated
  gradients: their per-canary likelihood ratios, sum_t x_{i,t}^T (y_t - sum_j x_{j,t} / 2), let
  no seeded bug show). The score is z_i = S_hat_i / se_i, N(S_i / se_i, 1).

The theorem holds for any guesses that are a function of the output and of what does not
depend on the coins; the grid of guess counts is fixed in advance and paid for by Bonferroni.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qem.audit import release_paths
from qem.audit.statistics import OneRunBound, one_run_bound
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy

ONE_RUN_CONFIDENCE = 0.95
"""Confidence of the one-run bound, as in Steinke et al. The delta term of the theorem, at least
2 m delta / v, keeps the p-value above it at far higher confidences (m = 1,000, delta = 1e-5:
about 2e-4 for v = 100 correct guesses)."""

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
"""k+ = k- = fraction x m guesses on each side, the grid fixed before any score is seen."""

GRAM_RIDGE = 1e-9
"""Relative ridge on the diagonal of X^T X, against canaries whose shifts are collinear to
rounding (the estimate stays a fixed function of the releases, so the bound stays valid)."""

MNIST_CANARIES = 1000
"""Canaries of the MNIST audit (k = 2048 subspace coordinates: their clipped gradients stay far
from collinear)."""

MNIST_CONFIGURATION: dict[str, Any] = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "subspace": "kronecker",
    "k": 2048,
    "rounds": 2,
}
"""``qem demo mnist``'s fine_tune options (the rest are fine_tune's defaults: GGN curvature,
damping 1e-2, the public-quantile clip norm, the line search on the public validation split)."""

SYNTHETIC_CONFIGURATION: dict[str, Any] = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "subspace": "identity",
    "curvature": "identity",
    "damping": 1.0,
    "clip_norm": 1.0,
    "prior_weight": 1.0,
}


@dataclass(frozen=True)
class RecordCanaries:
    """m canary records (inputs, labels), appended to the private data when included: the
    black-box audit of the whole private pass, canaries' per-example gradients included. In
    round t canary i moves the release by its clipped gradient gh_{i,t}, by the engine's own
    per-example pass in the round's context."""

    inputs: torch.Tensor
    labels: torch.Tensor
    kind = "records"

    @property
    def m(self) -> int:
        return len(self.labels)

    def clipped(self, context: dict[str, Any], t: int) -> np.ndarray:
        """gh_{i,t} (m, k)."""
        return release_paths.per_example_clipped((self.inputs, self.labels), context)

    def records_sum(
        self, private: tuple[torch.Tensor, torch.Tensor], capture: release_paths.Capture, t: int
    ) -> np.ndarray:
        """S_data,t, the clipped sum of the records without canaries in round t: a pass of its
        own, since the run's pass read the included canaries too."""
        return release_paths.private_sum(private, capture.passes[t])

    def with_included(
        self, private: tuple[torch.Tensor, torch.Tensor], included: np.ndarray
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], None]:
        """The private data with the included canaries appended; nothing to add to the sums."""
        chosen = torch.from_numpy(np.flatnonzero(included))
        inputs = torch.cat([private[0], self.inputs[chosen]])
        return (inputs, torch.cat([private[1], self.labels[chosen]])), None


@dataclass(frozen=True)
class GradientCanaries:
    """m white-box gradient canaries (Steinke, Nasr & Jagielski 2023, §7: canaries inserted in
    the gradients): canary i is a record whose clipped gradient in round t is
    gh_{i,t} = clip(L_t r_{i,t}), clipped by the engine's own clipping to the per-example bound
    (release_paths.clipped_along), with r_{1..m,t} public directions drawn from (seed, t) (only
    the inclusion is secret): orthonormal when m <= k (the Q of a Gaussian k x m matrix), else
    independent Normal(0, I_k). Its whitened shift x_{i,t} is then r_{i,t} / ||r_{i,t}|| times
    mu_t, the most any record can move the release, so for m <= k the canaries' shifts are
    orthogonal in every round and the GLS estimate of each inclusion is N(S_i, 1 / mu^2),
    mu^2 = sum_t mu_t^2: each canary is a mu-GDP test on its own, the strongest the theorem can
    use. The included canaries' sum is added to the round's clipped sum
    (``capture_run(added_gradients=...)``); everything else of the run is the real one."""

    m: int
    seed: int = 0
    kind = "gradients"

    def clipped(self, context: dict[str, Any], t: int) -> np.ndarray:
        """gh_{i,t} (m, k)."""
        rng = np.random.default_rng([self.seed, t])
        k = context["subspace"].k
        if self.m > k:
            return release_paths.clipped_along(rng.standard_normal((self.m, k)), context)
        frame, _ = np.linalg.qr(rng.standard_normal((k, self.m)))
        return release_paths.clipped_along(frame.T, context)

    def records_sum(
        self, private: tuple[torch.Tensor, torch.Tensor], capture: release_paths.Capture, t: int
    ) -> np.ndarray:
        """S_data,t: the sum the run's own private pass computed in round t, which read exactly
        the records without canaries (the canaries were added after it), so it depends on no
        coin."""
        return capture.pass_sums[t]

    def with_included(
        self, private: tuple[torch.Tensor, torch.Tensor], included: np.ndarray
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Callable[[dict[str, Any], int], Any]]:
        """The private data unchanged, and round t's addition: the included canaries' sum."""
        count = int(included.sum())

        def added(context: dict[str, Any], t: int) -> tuple[np.ndarray, int]:
            return self.clipped(context, t)[included].sum(axis=0), count

        return private, added


Canaries = RecordCanaries | GradientCanaries


@dataclass(frozen=True)
class OneRunTask:
    """What one run fine-tunes: the model, its per-example loss, public and validation data, the
    private records without canaries, the m canaries, and fine_tune's options."""

    name: str
    model: nn.Module
    public: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor] | None
    private: tuple[torch.Tensor, torch.Tensor]
    canaries: Canaries
    configuration: dict[str, Any]
    loss_fn: Callable = cross_entropy

    @property
    def m(self) -> int:
        return self.canaries.m


@dataclass(frozen=True)
class OneRunResult:
    """Outcome of a one-run audit (``scores`` and ``included`` are left out of ``to_dict``)."""

    task: str
    canaries: int
    canary_kind: str
    included_count: int
    claimed_epsilon: float
    accountant_epsilon: float
    delta: float
    confidence: float
    bound: OneRunBound
    verdict: str
    seconds: float
    noise_scale: float | None = None
    seeded_bug: str | None = None
    scores: np.ndarray = field(default=None, repr=False)
    included: np.ndarray = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "task": self.task,
            "canaries": self.canaries,
            "canary_kind": self.canary_kind,
            "included": self.included_count,
            "claimed_epsilon": self.claimed_epsilon,
            "accountant_epsilon": self.accountant_epsilon,
            "delta": self.delta,
            "confidence": self.confidence,
            "epsilon_lower_bound": self.bound.epsilon,
            "guesses_per_side": self.bound.positive_guesses,
            "correct_guesses": self.bound.correct,
            "guess_grid": self.bound.candidates,
            "verdict": self.verdict,
            "seconds": self.seconds,
            "noise_scale": self.noise_scale,
            "seeded_bug": self.seeded_bug,
        }


def inclusion_coins(m: int) -> np.ndarray:
    """m independent fair coins from the operating system's CSPRNG (``secrets``)."""
    bits = secrets.randbits(m) if m > 0 else 0
    return np.array([(bits >> i) & 1 for i in range(m)], dtype=bool)


def one_run_audit(
    task: OneRunTask,
    *,
    confidence: float = ONE_RUN_CONFIDENCE,
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS,
    noise_scale: float | None = None,
    seeded_bug: str | None = None,
    included: np.ndarray | None = None,
) -> OneRunResult:
    """One run of ``task`` with its canaries included by fresh OS coins (``included`` replaces
    them: tests only), the canaries scored from the releases (module docstring) and the
    Steinke-Nasr-Jagielski eps lower bound at the task's delta. ``noise_scale`` (audit-only)
    multiplies the mechanism's noise std, ``seeded_bug`` plants a fault of
    release_paths.SEEDED_BUGS, so that one can see the audit flag them."""
    if not 0.5 < confidence < 1.0:
        raise InvalidParameterError(f"confidence must lie in (0.5, 1), got {confidence!r}.")
    if task.m < 2:
        raise InvalidParameterError(f"a one-run audit needs at least 2 canaries, got {task.m}.")
    config = {**task.configuration, "adjacency": "add_remove"}
    if config.get("mode", "gdp") != "gdp" or "schedule" in config:
        raise InvalidParameterError("the one-run audit scores sequential Gaussian-DP rounds.")
    config.setdefault("N", len(task.private[1]) + task.m // 2)
    start = time.perf_counter()
    coins = inclusion_coins(task.m) if included is None else np.asarray(included, dtype=bool)
    private, added = task.canaries.with_included(task.private, coins)
    validation = {} if task.validation is None else {"validation_data": task.validation}
    with (
        release_paths.seeded_bug(seeded_bug),
        release_paths.scaled_noise(noise_scale) if noise_scale is not None else nullcontext(),
    ):
        capture = release_paths.capture_run(
            task.model,
            task.loss_fn,
            task.public,
            private,
            {**config, **validation},
            added_gradients=added,
        )
    scores = canary_scores(capture, task)
    bound = one_run_bound(scores, coins, config["delta"], confidence, guess_fractions)
    report = capture.result.report
    return OneRunResult(
        task=task.name,
        canaries=task.m,
        canary_kind=task.canaries.kind,
        included_count=int(coins.sum()),
        claimed_epsilon=float(config["epsilon"]),
        accountant_epsilon=float(report.accountant["epsilon"]),
        delta=float(config["delta"]),
        confidence=confidence,
        bound=bound,
        verdict="FAIL" if bound.epsilon > config["epsilon"] else "PASS",
        seconds=time.perf_counter() - start,
        noise_scale=noise_scale,
        seeded_bug=seeded_bug,
        scores=scores,
        included=coins,
    )


def canary_scores(capture: release_paths.Capture, task: OneRunTask) -> np.ndarray:
    """z_i of the module docstring: the generalised least-squares estimate of every canary's
    inclusion from all the captured rounds at once, divided by its standard error."""
    designs, responses = [], []
    rounds = zip(capture.mechanisms, capture.passes, capture.releases, strict=True)
    for t, (mechanism, context, w) in enumerate(rounds):
        clipped = task.canaries.clipped(context, t)
        data_mean = mechanism.mean(task.canaries.records_sum(task.private, capture, t))
        shifts = np.stack([mechanism.mean(g) for g in clipped], axis=1)  # (k, m): m(gh_i)
        designs.append(mechanism.whitener @ shifts)
        responses.append(mechanism.whitener @ (w - data_mean))
    X, y = np.concatenate(designs), np.concatenate(responses)
    gram = X.T @ X
    gram[np.diag_indices_from(gram)] *= 1.0 + GRAM_RIDGE
    estimate = np.linalg.solve(gram, X.T @ y)
    standard_error = np.sqrt(np.diag(np.linalg.inv(gram)))
    return estimate / standard_error


# -- tasks --------------------------------------------------------------------------------------


def mnist_canaries(
    m: int, like: torch.Tensor, classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """m images of uniform pixel noise over the value range of ``like`` (public images) with
    uniformly random labels: public, seeded (the canaries are known; only their inclusion is
    secret)."""
    rng = np.random.default_rng(seed)
    low, high = float(like.min()), float(like.max())
    images = rng.uniform(low, high, (m, *like.shape[1:])).astype(np.float32)
    return torch.from_numpy(images).to(like.dtype), torch.from_numpy(rng.integers(0, classes, m))


CANARY_KINDS = ("gradients", "records")
"""Canaries of the MNIST audit: white-box gradient canaries (GradientCanaries, the default:
nearly orthogonal, the strongest test of the mechanism, its calibration and its accounting) or
images of pixel noise with random labels (RecordCanaries: black-box, through the per-example
pass too, but their gradients are nearly collinear and the test is weak, docs/theory.md §17)."""


def mnist_task(
    canaries: int = MNIST_CANARIES,
    *,
    kind: str = "gradients",
    private_size: int | None = None,
    cache_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> OneRunTask:
    """The MNIST S1 scenario of ``qem demo mnist``: the CNN pretrained on the 1,000 public images
    (cached), fine-tuned on the 49,000 private ones (``private_size`` fewer) plus the canaries
    of ``kind`` (CANARY_KINDS), with the demo's options (MNIST_CONFIGURATION) and its public
    validation split."""
    if kind not in CANARY_KINDS:
        raise InvalidParameterError(f"canary kind must be one of {CANARY_KINDS}, got {kind!r}.")
    from qem.datasets.mnist import load_mnist
    from qem.datasets.scenarios import mnist_s1
    from qem.pretrain import pretrained_mnist_cnn

    scenario = mnist_s1(load_mnist(), seed=0, private_size=private_size or 49_000)
    model = pretrained_mnist_cnn(scenario, cache_dir)
    if kind == "gradients":
        planted: Canaries = GradientCanaries(canaries)
    else:
        planted = RecordCanaries(*mnist_canaries(canaries, scenario.public_train[0]))
    return OneRunTask(
        name=f"mnist_s1 ({len(scenario.private_train[1])} records + {canaries} {kind} canaries)",
        model=model,
        public=scenario.public_train,
        validation=scenario.public_valid,
        private=scenario.private_train,
        canaries=planted,
        configuration={**MNIST_CONFIGURATION, **(configuration or {})},
    )


def synthetic_task(
    canaries: int = 500,
    *,
    records: int = 200,
    features: int = 4,
    reach: float = 10.0,
    configuration: dict[str, Any] | None = None,
    seed: int = 0,
) -> OneRunTask:
    """A small task on which one run takes seconds: a bias-free linear 2-class model at
    theta0 = 0 over ``features`` data features and one feature per canary; canary i is
    x = reach e_(features + i) with a random label, so that the canaries' gradients are
    orthogonal to each other and to the data's, far above the clip norm."""
    rng = np.random.default_rng(seed)
    width = features + canaries

    def records_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.zeros((n, width))
        x[:, :features] = rng.standard_normal((n, features))
        return torch.from_numpy(x), torch.from_numpy(rng.integers(0, 2, n))

    model = nn.Linear(width, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.zeros(canaries, width, dtype=torch.float64)
    x[torch.arange(canaries), features + torch.arange(canaries)] = reach
    labels = torch.from_numpy(rng.integers(0, 2, canaries))
    return OneRunTask(
        name=f"synthetic ({records} records + {canaries} canaries)",
        model=model,
        public=records_of(100),
        validation=None,
        private=records_of(records),
        canaries=RecordCanaries(x, labels),
        configuration={**SYNTHETIC_CONFIGURATION, **(configuration or {})},
    )
