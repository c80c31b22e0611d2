"""Empirical privacy audit (a check of docs/theory.md §3 and §6): black-box membership
inference on a synthetic worst-case neighbouring pair, through the public API ``qem.fine_tune``.

The audit fixes everything public (a tiny logistic-regression model at theta0 = 0, public data,
curvature, clip norm), builds two neighbouring private datasets D and D' whose differing record
is as influential as the clip allows, draws n releases on each with noise from operating-system
entropy, and measures how well the released parameters tell D from D'.

Test statistic: t(theta) = v^T (theta - theta0), with v = g(z) - g(z') the difference of the
gradients of the two differing records at theta0 (add/remove: v = -g(z'), z' the added record).
Both releases are Normal with the same covariance Sigma (docs/theory.md §1), and
Sigma^-1 (m_D' - m_D) is proportional to P^T v, so t is the most powerful (Neyman-Pearson)
statistic and its standardised shift is the Mahalanobis distance between the two releases: mu
exactly, for a worst-case pair (docs/theory.md §3).

* Empirical mu: mu_hat = |mean' - mean| / pooled sd of t over the n + n releases, with a
  confidence interval from the normal approximation to the sampling distribution of a
  standardised mean difference, se^2 = (n0 + n1) / (n0 n1) + d^2 / (2 (n0 + n1))
  (Hedges & Olkin 1985, §5.B); the interval of the signed shift is folded to one for |d|.
* Epsilon lower bound: the threshold test "D' if t > tau", tau chosen on a held-out half of the
  releases (split by the audit's own fixed seed), its false positive and false negative rates
  bounded on the other half by exact one-sided Clopper-Pearson bounds at alpha/2 each, so that
  eps_lb = max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub)) is a
  lower bound on the true eps with probability >= 1 - alpha (Jagielski et al. 2020; Nasr et al.
  2021).

Verdict: FAIL when the interval of mu lies entirely above the claimed mu = calibrate_gdp_mu(eps,
delta) (Gaussian-DP mode), or when eps_lb > eps; PASS otherwise. The claim is computed from the
configuration passed to fine_tune, never read from its report. An audit catches violations; a
PASS does not prove privacy.

What the final model shows: the audit sees only ``result.model``. Sequential rounds (with the
fixed ``prior_weight``) add one shift per round to t, so the visible mu is the composed one;
with ``partition_rounds`` the rounds that do not read the differing record add noise only, so
the visible mu is mu / sqrt(T) for T equal chunks; with the public line search
(``prior_weight=None``) t is scaled by a random step length, which can only lower mu_hat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import special
from torch import nn
from tqdm.auto import tqdm

import qem
from qem.checks import check_delta, check_epsilon
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy
from qem.models import LogisticRegression
from qem.privacy.gdp import calibrate_gdp_mu
from qem.privacy.sensitivity import Adjacency

DEFAULT_CONFIDENCE = 0.9999
"""Confidence 1 - alpha of the mu interval and of the eps bound. A correct implementation FAILs
by the mu check with probability alpha / 2 (one-sided) and by the eps check with probability at
most alpha: about 1.5e-4 per audit."""

FEATURES = 4
"""Input features of the audit model; the last one is used only by the differing record."""
RECORDS = 32
"""Private records in the larger dataset of the pair."""
PUBLIC_RECORDS = 8
REACH = 100.0
"""The differing record is x = REACH e_last: at theta0 its gradient has Euclidean norm
REACH / sqrt(2) (its bias component is 1/REACH of it) and dual norm REACH / sqrt(2 gamma)."""
BINDING_MARGIN = 1000.0
"""The clip norm must lie this factor below both norms of the differing record's gradient at
theta0, so that clipping still binds in later rounds, where softmax(W x + b) has moved."""

AUDIT_DEFAULTS: dict[str, Any] = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "subspace": "identity",
    "curvature": "identity",
    "damping": 1.0,
    "clip_norm": 1e-3,
    "prior_weight": 1.0,
}
"""fine_tune keywords of the audit unless a configuration overrides them. ``clip_norm`` is far
below the differing record's gradient norm so that clipping binds in every round;
``prior_weight`` fixes lam so that t is a clean Gaussian shift (None: public line search)."""

CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "replace_one": {},
    "add_remove": {"adjacency": "add_remove"},
    "euclidean": {"clipping": "euclidean", "curvature": "ggn"},
    "rounds": {"rounds": 2},
    "partition_rounds": {"rounds": 2, "partition_rounds": True},
    "pure": {"mode": "pure"},
}
"""Named configurations (overrides of AUDIT_DEFAULTS): adding one is one entry."""

_REFUSED = {
    "seed": "the audit must see the real noise path (operating-system entropy)",
    "noise": "the audit must see the real noise path",
    "progress": "the audit sets it",
    "public_sample_size": "the audit's public data is fixed",
    "validation_data": "the audit's public data is fixed",
}


@dataclass(frozen=True)
class WorstCasePair:
    """Neighbouring private datasets D, D' and everything public about them.

    ``direction`` is v (unit norm, over ``model.parameters()`` in order): D' moves t = v^T
    (theta - theta0) up. ``N`` is the declared dataset size under add/remove, else None.
    """

    model: nn.Module
    public: tuple[torch.Tensor, torch.Tensor]
    private: tuple[torch.Tensor, torch.Tensor]
    neighbour: tuple[torch.Tensor, torch.Tensor]
    direction: torch.Tensor
    N: int | None


def worst_case_pair(adjacency: Adjacency | str, seed: int = 0) -> WorstCasePair:
    """A worst-case neighbouring pair on LogisticRegression(FEATURES, 2) at theta0 = 0.

    The differing record is x = REACH e_last; every other record (public or private) has 0 in
    the last feature. Then (i) at any theta its gradient (softmax(W x + b) - e_y) (x) [x; 1] points
    in opposite directions for labels 0 and 1, both far beyond the clip norm, so the two clipped
    gradients differ by s C in the clipping norm; (ii) the public curvature is zero on the last
    feature's weights, so the record lies (up to its 1/REACH bias component) along an eigenvector
    of A for lambda_min(A) = gamma, which also makes Euclidean clipping attain C / sqrt(gamma).
    replace_one: D = {(x, 0)} + others, D' = {(x, 1)} + others. add_remove: D = others,
    D' = {(x, 1)} + others, N = |D'|. The differing record comes first, so that
    ``partition_rounds`` puts it in the first chunk.
    """
    adjacency = Adjacency(adjacency)
    rng = torch.Generator().manual_seed(seed)

    def records(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=rng, dtype=torch.float64)
        x[:, -1] = 0.0
        return x, torch.randint(0, 2, (n,), generator=rng)

    model = LogisticRegression(FEATURES, 2).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    public = records(PUBLIC_RECORDS)
    others_x, others_y = records(RECORDS - 1)
    far = torch.zeros(1, FEATURES, dtype=torch.float64)
    far[0, -1] = REACH

    def with_far(label: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([far, others_x]), torch.cat([torch.tensor([label]), others_y])

    def gradient(label: int) -> torch.Tensor:
        model.zero_grad()
        cross_entropy(model(far), torch.tensor([label])).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach()

    if adjacency is Adjacency.REPLACE_ONE:
        private, neighbour, N = with_far(0), with_far(1), None
        direction = gradient(0) - gradient(1)
    else:
        private, neighbour, N = (others_x, others_y), with_far(1), RECORDS
        direction = -gradient(1)
    model.zero_grad(set_to_none=True)
    return WorstCasePair(model, public, private, neighbour, direction / direction.norm(), N)


def _parameter_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def statistic(model: nn.Module, pair: WorstCasePair) -> float:
    """t = v^T (theta - theta0) of a released model."""
    return float((_parameter_vector(model) - _parameter_vector(pair.model)) @ pair.direction)


# -- statistics of the two samples ---------------------------------------------------------


def _two_sided_z(confidence: float) -> float:
    return float(special.ndtri(1.0 - (1.0 - confidence) / 2.0))


def standardized_shift(
    stat0: np.ndarray, stat1: np.ndarray, confidence: float
) -> tuple[float, float, float]:
    """(|d|, lower, upper): d = (mean1 - mean0) / pooled sd and a normal-approximation interval
    of confidence ``confidence`` for |d|, se^2 = (n0 + n1) / (n0 n1) + d^2 / (2 (n0 + n1))
    (Hedges & Olkin 1985). The interval of the signed d is folded: if it holds 0, |d| lies in
    [0, max(|lo|, |hi|)]."""
    stat0, stat1 = np.asarray(stat0, np.float64), np.asarray(stat1, np.float64)
    n0, n1 = stat0.size, stat1.size
    pooled = math.sqrt(
        ((n0 - 1) * stat0.var(ddof=1) + (n1 - 1) * stat1.var(ddof=1)) / (n0 + n1 - 2)
    )
    d = (stat1.mean() - stat0.mean()) / pooled
    se = math.sqrt((n0 + n1) / (n0 * n1) + d * d / (2.0 * (n0 + n1)))
    lo, hi = d - _two_sided_z(confidence) * se, d + _two_sided_z(confidence) * se
    if lo > 0:
        return float(d), float(lo), float(hi)
    if hi < 0:
        return float(-d), float(-hi), float(-lo)
    return float(abs(d)), 0.0, float(max(-lo, hi))


def clopper_pearson_upper(
    successes: np.ndarray | int, trials: int, alpha: float
) -> np.ndarray | float:
    """Exact one-sided upper bound at level 1 - alpha on a binomial rate (Clopper & Pearson
    1934): the (1 - alpha) quantile of Beta(k + 1, n - k), and 1 when k = n."""
    k = np.asarray(successes, dtype=np.float64)
    full = k >= trials
    bound = np.where(
        full, 1.0, special.betaincinv(k + 1.0, np.where(full, 1.0, trials - k), 1.0 - alpha)
    )
    return float(bound) if bound.ndim == 0 else bound


def threshold_epsilon(
    stat0: np.ndarray, stat1: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each threshold tau of the test "D' if t > tau": (eps lower bound, FPR_ub, FNR_ub).

    FPR = P_D(t > tau), FNR = P_D'(t <= tau), each bounded above by Clopper-Pearson at alpha/2;
    eps_lb = max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub), 0).
    """
    sorted0, sorted1 = np.sort(stat0), np.sort(stat1)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    false_pos = sorted0.size - np.searchsorted(sorted0, thresholds, side="right")
    false_neg = np.searchsorted(sorted1, thresholds, side="right")
    fpr_ub = np.asarray(clopper_pearson_upper(false_pos, sorted0.size, alpha / 2.0))
    fnr_ub = np.asarray(clopper_pearson_upper(false_neg, sorted1.size, alpha / 2.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.log(np.maximum(1.0 - delta - fnr_ub, 0.0) / fpr_ub)
        backward = np.log(np.maximum(1.0 - delta - fpr_ub, 0.0) / fnr_ub)
    eps = np.maximum(np.nan_to_num(np.maximum(forward, backward), nan=0.0, neginf=0.0), 0.0)
    return eps, fpr_ub, fnr_ub


@dataclass(frozen=True)
class EpsilonBound:
    """A threshold test's eps lower bound and the numbers behind it."""

    epsilon: float
    threshold: float
    fpr_upper: float
    fnr_upper: float


def epsilon_lower_bound(
    stat0: np.ndarray, stat1: np.ndarray, delta: float, confidence: float, seed: int = 0
) -> EpsilonBound:
    """Clopper-Pearson eps lower bound of the best threshold test, with the threshold chosen on
    a random half of each sample (permutation from ``seed``) and the bound computed on the other
    half, so that the choice does not bias the bound. Valid with probability >= confidence.

    Candidate thresholds are the midpoints between consecutive values of the selection half;
    among equally good ones the middle one is taken."""
    rng = np.random.default_rng(seed)
    halves = [np.array_split(rng.permutation(np.asarray(s, np.float64)), 2) for s in (stat0, stat1)]
    (select0, held0), (select1, held1) = halves
    alpha = 1.0 - confidence
    pooled = np.unique(np.concatenate([select0, select1]))
    candidates = (pooled[1:] + pooled[:-1]) / 2.0 if pooled.size > 1 else pooled
    eps, _, _ = threshold_epsilon(select0, select1, candidates, delta, alpha)
    best = np.flatnonzero(eps == eps.max())
    threshold = float(candidates[best[best.size // 2]])
    eps, fpr_ub, fnr_ub = threshold_epsilon(held0, held1, np.array([threshold]), delta, alpha)
    return EpsilonBound(float(eps[0]), threshold, float(fpr_ub[0]), float(fnr_ub[0]))


# -- the audit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit; ``statistics`` holds t on D and on D' (left out of ``to_dict``)."""

    configuration: dict[str, Any]
    n: int
    confidence: float
    claimed_epsilon: float
    delta: float
    claimed_mu: float | None
    mu: float
    mu_interval: tuple[float, float]
    epsilon_bound: EpsilonBound
    verdict: str
    reasons: list[str]
    seconds: float
    statistics: tuple[np.ndarray, np.ndarray] = field(repr=False)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "configuration": self.configuration,
            "n_per_dataset": self.n,
            "confidence": self.confidence,
            "claimed_epsilon": self.claimed_epsilon,
            "delta": self.delta,
            "claimed_mu": self.claimed_mu,
            "empirical_mu": self.mu,
            "empirical_mu_interval": list(self.mu_interval),
            "mu_interval_method": "normal approximation (Hedges & Olkin 1985)",
            "epsilon_lower_bound": self.epsilon_bound.epsilon,
            "threshold": self.epsilon_bound.threshold,
            "fpr_upper": self.epsilon_bound.fpr_upper,
            "fnr_upper": self.epsilon_bound.fnr_upper,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "seconds": self.seconds,
        }


def audit_configuration(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """AUDIT_DEFAULTS updated by ``config`` (fine_tune keywords), checked for what the audit
    cannot allow: a fixed noise seed, disabled noise, a clip norm that might not bind."""
    merged = {**AUDIT_DEFAULTS, **(config or {})}
    for key, why in _REFUSED.items():
        if key in merged:
            raise InvalidParameterError(f"the audit does not take {key!r}: {why}.")
    record_norm = REACH / math.sqrt(2.0 * max(1.0, float(merged["damping"])))
    clip_norm = merged.get("clip_norm")
    if clip_norm is None or not 0 < clip_norm <= record_norm / BINDING_MARGIN:
        raise InvalidParameterError(
            f"the audit needs an explicit clip_norm in (0, {record_norm / BINDING_MARGIN:.3g}], "
            f"far below the differing record's gradient norm {record_norm:.3g}, so that "
            f"clipping binds; got {clip_norm!r} (the default is {AUDIT_DEFAULTS['clip_norm']})."
        )
    try:
        Adjacency(merged.get("adjacency", Adjacency.REPLACE_ONE))
    except ValueError:
        raise InvalidParameterError(
            f"adjacency must be one of {[a.value for a in Adjacency]}, got {merged['adjacency']!r}."
        ) from None
    merged["epsilon"] = check_epsilon(merged["epsilon"])
    merged["delta"] = check_delta(merged["delta"])
    return merged


def draw_statistics(
    config: Mapping[str, Any], pair: WorstCasePair, n: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """t of n releases of ``qem.fine_tune`` on D and n on D' (interleaved), noise from
    operating-system entropy; only ``result.model`` is read. torch runs on one thread meanwhile:
    on the audit's 10-parameter model intra-op threads only add synchronisation (4x the CPU
    time per release, measured on 2 busy cores)."""
    kwargs = {**config, "progress": False}

    def release(data: tuple[torch.Tensor, torch.Tensor]) -> float:
        result = qem.fine_tune(pair.model, cross_entropy, pair.public, data, **kwargs)
        return statistic(result.model, pair)

    stats = np.empty((2, n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in tqdm(range(n), desc="audit releases", unit="pair", disable=not progress):
            stats[0, i] = release(pair.private)
            stats[1, i] = release(pair.neighbour)
    finally:
        torch.set_num_threads(threads)
    return stats[0], stats[1]


def run_audit(
    config: Mapping[str, Any] | None = None,
    *,
    n: int = 2000,
    confidence: float = DEFAULT_CONFIDENCE,
    split_seed: int = 0,
    progress: bool = False,
) -> AuditResult:
    """Audit fine_tune with ``config`` (fine_tune keywords over AUDIT_DEFAULTS) on a worst-case
    pair: n releases per dataset, the empirical mu with its interval, the eps lower bound, and the
    verdict (see the module docstring). ``split_seed`` fixes the audit's own randomness (the
    held-out split); the mechanism's noise is never seeded."""
    if int(n) < 20:
        raise InvalidParameterError(f"the audit needs n >= 20 releases per dataset, got {n}.")
    if not 0.5 < confidence < 1.0:
        raise InvalidParameterError(f"confidence must lie in (0.5, 1), got {confidence!r}.")
    config = audit_configuration(config)
    pure = config.get("mode", "gdp") == "pure"
    epsilon, delta = config["epsilon"], 0.0 if pure else config["delta"]
    claimed_mu = None if pure else calibrate_gdp_mu(epsilon, delta)

    start = time.perf_counter()
    pair = worst_case_pair(config.get("adjacency", Adjacency.REPLACE_ONE))
    if pair.N is not None:
        config.setdefault("N", pair.N)
    stat0, stat1 = draw_statistics(config, pair, int(n), progress=progress)
    mu, lo, hi = standardized_shift(stat0, stat1, confidence)
    bound = epsilon_lower_bound(stat0, stat1, delta, confidence, seed=split_seed)

    reasons = []
    if claimed_mu is not None and lo > claimed_mu:
        reasons.append(
            f"empirical mu {mu:.4f} [{lo:.4f}, {hi:.4f}] lies above the claimed mu {claimed_mu:.4f}"
        )
    if bound.epsilon > epsilon:
        reasons.append(
            f"epsilon lower bound {bound.epsilon:.4f} exceeds the claimed epsilon {epsilon:g}"
        )
    return AuditResult(
        configuration=config,
        n=int(n),
        confidence=confidence,
        claimed_epsilon=epsilon,
        delta=delta,
        claimed_mu=claimed_mu,
        mu=mu,
        mu_interval=(lo, hi),
        epsilon_bound=bound,
        verdict="FAIL" if reasons else "PASS",
        reasons=reasons,
        seconds=time.perf_counter() - start,
        statistics=(stat0, stat1),
    )
