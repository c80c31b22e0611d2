"""Running a pair audit (docs/theory.md §17): black-box membership inference on a worst-case
neighbouring pair (qem.audit.pairs) for each release path of qem, with a verdict against the
claim computed independently of the engine.

Two methods:

* batched (default): ``qem.fine_tune`` runs once on D and once on D' (and, for Poisson, once on
  D without z's influence), every round's mechanism and clipped gradient sum recorded
  (qem.audit.release_paths.capture_run), and the engine continued with the release w_t = 0, so
  that every round of every side sees the same public state (theta0, the round's subspace,
  curvature and its Cholesky whitening, clip norm); the audit then draws n releases per side and
  round from the recorded mechanisms in one batch. Every round's release is observed. This is
  valid for adaptive composition: whatever the earlier releases were (0 is one possible value),
  round t given them must be the claimed Gaussian mechanism, so fixing them and drawing round t
  afresh audits the composition of the rounds' conditional mechanisms, whose mu (or PLD) is the
  claim. At theta0 the pair is worst case in every round (qem.audit.pairs); with the engine's
  own releases instead, a step of the line search can move the record's logit until clipping
  no longer binds for one of its labels (measured: sensitivity attained 0.5 to 0.8 of the bound
  in about one round of ten), which would hide part of an overspend. The trajectory itself is
  audited end to end.
* end to end: n full fine_tune runs per side, with only the final model observed (the engine
  as a whole, its steps included); slower, hence fewer releases.

Test statistic: the log-likelihood ratio of the two sides summed over the rounds, computed
from the recorded mechanisms' public means and covariance (fixed before the releases are
drawn, so any fault of the noise only makes the test weaker or stronger, never invalid):
Gaussian rounds l_t(w) = (m'_t - m_t)^T Sigma_t^-1 (w - (m_t + m'_t) / 2), which is N(+-mu_t^2/2,
mu_t^2) under the claim, so the standardised shift of sum_t l_t estimates the composed mu
exactly; Poisson rounds the log ratio of the two mixtures (1 - q) N(m0) + q N(m) and (1 - q)
N(m0) + q N(m'); pure mode the Gaussian ratio (the truncation to {||w||_A <= R} adds a constant).

Verdict FAIL when any of: the interval of the empirical mu lies above the claimed mu (Gaussian
paths); the Clopper-Pearson eps lower bound exceeds epsilon; the empirical trade-off, widened
by a simultaneous DKW band, lies below the claimed trade-off curve (the Gaussian curve of mu,
dp-accounting's PLD profile for Poisson, the eps-DP curve in pure mode); for Poisson, the
run's (z, q, T) spend more than epsilon by an independent PLD computation. The claim (mu from
(eps, delta) by the exact Gaussian profile, the PLD) is computed here, not read from the
engine. An audit catches violations; a PASS does not prove privacy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
import torch
from dp_accounting import dp_event
from scipy import optimize, special

from qem.audit import release_paths
from qem.audit.pairs import REACH, WorstCasePair, statistic, worst_case_pair
from qem.audit.statistics import (
    EpsilonBound,
    epsilon_lower_bound,
    gaussian_tradeoff,
    profile_tradeoff,
    standardized_shift,
    tradeoff_excess,
)
from qem.checks import check_delta, check_epsilon
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy
from qem.progress import progress_bar

DEFAULT_CONFIDENCE = 0.9999
"""Confidence 1 - alpha of every interval and bound. A correct implementation FAILs by the mu
check with probability alpha / 2, by the eps bound and by the trade-off band with probability
at most alpha each: at most 2.5e-4 per audit."""

DEFAULT_N = {"batched": 2000, "end_to_end": 500}
"""Releases per dataset by default."""

AUDIT_DEFAULTS: dict[str, Any] = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "subspace": "srht",
    "k": 6,
    "curvature": "ggn",
    "damping": 0.1,
}
"""fine_tune keywords of the batched audit unless a path overrides them: an SRHT subspace with
a GGN curvature of the public data and its Cholesky whitening, the public-quantile clip norm
(clip_norm None: fine_tune's default quantile 0.9) and the public line search."""

PATHS: dict[str, dict[str, Any]] = {
    "sequential": {"rounds": 2},
    "add_remove": {"adjacency": "add_remove", "rounds": 2},
    "identity": {"subspace": "identity", "k": None},
    "kronecker": {"subspace": "kronecker", "curvature": "kfac", "rounds": 2},
    "euclidean": {"clipping": "euclidean", "subspace": "identity", "k": None},
    "given_clip_norm": {"clip_norm": 0.05, "prior_weight": 1.0},
    "partitioned": {"schedule": {"kind": "partitioned", "rounds": 4}},
    "partitioned_epochs": {"schedule": {"kind": "partitioned", "rounds": 2, "epochs": 2}},
    "poisson": {"schedule": {"kind": "poisson", "sampling_rate": 0.5, "rounds": 2}},
    "poisson_add_remove": {
        "schedule": {"kind": "poisson", "sampling_rate": 0.5, "rounds": 2},
        "adjacency": "add_remove",
    },
    "secure_noise": {"secure_noise": True, "rounds": 2},
    "pure": {"mode": "pure"},
}
"""The release paths the batched audit covers, as overrides of AUDIT_DEFAULTS (adding one is one
entry): schedules (sequential, partitioned, partitioned epochs, Poisson), adjacencies, the
identity / SRHT / Kronecker (with K-FAC) subspaces, dual and Euclidean clipping, the public
quantile and a given clip norm, the line search and a fixed lam, secure noise, pure mode."""

END_TO_END_DEFAULTS: dict[str, Any] = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "subspace": "identity",
    "curvature": "identity",
    "damping": 1.0,
    "clip_norm": 1e-3,
    "prior_weight": 1.0,
}
"""fine_tune keywords of the end-to-end audit: identity subspace and A = gamma I, so that the
released shift lies along the fixed direction v of the pair in parameter space; a clip norm far
below the record's gradient (clipping binds in every round); lam fixed, so that the final
model is theta0 + sum_t w_t."""

END_TO_END_PATHS = ("sequential", "add_remove", "euclidean", "partitioned", "secure_noise", "pure")
"""Paths the end-to-end audit takes (their schedule, adjacency, clipping, noise or mode over
END_TO_END_DEFAULTS)."""

_END_TO_END_KEYS = ("rounds", "adjacency", "clipping", "schedule", "secure_noise", "mode")
BINDING_MARGIN = 1000.0
"""End to end: the clip norm must lie this factor below the record's gradient norm, so that
clipping still binds in later rounds."""

_REFUSED = {
    "seed": "the audit must see the real noise path (operating-system entropy)",
    "noise": "the audit must see the real noise path",
    "progress": "the audit sets it",
    "public_sample_size": "the audit's public data is fixed",
    "validation_data": "the audit's public data is fixed",
    "on_release": "the audit reads the releases itself",
    "distributed": "the audit runs in one process",
}


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit; ``statistics`` holds t on D and on D' (left out of ``to_dict``)."""

    path: str
    method: str
    configuration: dict[str, Any]
    n: int
    confidence: float
    claimed_epsilon: float
    delta: float
    claimed_mu: float | None
    mu: float | None
    mu_interval: tuple[float, float] | None
    pair_mu: float | None
    epsilon_bound: EpsilonBound
    tradeoff_excess: float
    accountant_epsilon: float | None
    attained: list[float]
    verdict: str
    reasons: list[str]
    seconds: float
    seeded_bug: str | None = None
    noise_scale: float | None = None
    statistics: tuple[np.ndarray, np.ndarray] = field(default=(), repr=False)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "path": self.path,
            "method": self.method,
            "configuration": self.configuration,
            "seeded_bug": self.seeded_bug,
            "noise_scale": self.noise_scale,
            "n_per_dataset": self.n,
            "confidence": self.confidence,
            "claimed_epsilon": self.claimed_epsilon,
            "delta": self.delta,
            "claimed_mu": self.claimed_mu,
            "empirical_mu": self.mu,
            "empirical_mu_interval": None if self.mu_interval is None else list(self.mu_interval),
            "mu_interval_method": "normal approximation (Hedges & Olkin 1985)",
            "pair_mu": self.pair_mu,
            "sensitivity_attained": self.attained,
            "epsilon_lower_bound": self.epsilon_bound.epsilon,
            "threshold": self.epsilon_bound.threshold,
            "fpr_upper": self.epsilon_bound.fpr_upper,
            "fnr_upper": self.epsilon_bound.fnr_upper,
            "tradeoff_excess": self.tradeoff_excess,
            "accountant_epsilon": self.accountant_epsilon,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "seconds": self.seconds,
        }


# -- the claim, computed here --------------------------------------------------------------


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu whose exact Gaussian profile delta(eps) = Phi(-eps/mu + mu/2) - e^eps
    Phi(-eps/mu - mu/2) (Balle & Wang 2018) meets (epsilon, delta), by brentq: the claim of
    every Gaussian-DP path, computed independently of qem.privacy."""

    def excess(mu: float) -> float:
        return (
            special.ndtr(-epsilon / mu + mu / 2)
            - math.exp(epsilon) * special.ndtr(-epsilon / mu - mu / 2)
            - delta
        )

    return float(optimize.brentq(excess, 1e-6, 100.0, xtol=1e-14))


def _relation(adjacency: str) -> dp_accounting.NeighboringRelation:
    if adjacency == "add_remove":
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.NeighboringRelation.REPLACE_ONE


def poisson_accountant(
    schedule: Mapping[str, Any], adjacency: str
) -> dp_accounting.pld.PLDAccountant:
    """dp-accounting's PLD accountant of T Poisson(q)-subsampled Gaussian(z) rounds, from the
    run's public report (q, z, T)."""
    accountant = dp_accounting.pld.PLDAccountant(
        _relation(adjacency), value_discretization_interval=1e-4
    )
    sampled = dp_event.PoissonSampledDpEvent(
        schedule["sampling_rate"], dp_event.GaussianDpEvent(schedule["noise_multiplier"])
    )
    accountant.compose(dp_event.SelfComposedDpEvent(sampled, schedule["rounds"]))
    return accountant


EPSILON_GRID = np.linspace(0.0, 12.0, 241)
"""Epsilons at which a PLD profile is read for its trade-off curve."""


# -- configurations ----------------------------------------------------------------------------


def audit_configuration(
    path: str | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    end_to_end: bool = False,
) -> tuple[str, dict[str, Any]]:
    """(name, fine_tune keywords) of a path name (PATHS) or of explicit keywords, over the
    method's defaults, with ``overrides`` (e.g. the budget) last; refuses what the audit cannot
    allow (a noise seed, disabled noise, and end to end a clip norm that might not bind or a
    path it does not take)."""
    if isinstance(path, str):
        if path not in PATHS:
            raise InvalidParameterError(f"unknown audit path {path!r}; paths: {sorted(PATHS)}.")
        name, path_keys = path, PATHS[path]
    else:
        name, path_keys = "custom", dict(path)
    if end_to_end:
        if name not in (*END_TO_END_PATHS, "custom"):
            raise InvalidParameterError(
                f"the end-to-end audit takes the paths {list(END_TO_END_PATHS)}, not {name!r}."
            )
        keys = {k: v for k, v in path_keys.items() if name == "custom" or k in _END_TO_END_KEYS}
        merged = {**END_TO_END_DEFAULTS, **keys, **(overrides or {})}
    else:
        merged = {**AUDIT_DEFAULTS, **path_keys, **(overrides or {})}
    for key, why in _REFUSED.items():
        if key in merged:
            raise InvalidParameterError(f"the audit does not take {key!r}: {why}.")
    if merged.get("adjacency", "replace_one") not in ("replace_one", "add_remove"):
        raise InvalidParameterError(
            f"adjacency must be 'replace_one' or 'add_remove', got {merged['adjacency']!r}."
        )
    if end_to_end:
        record_norm = REACH / math.sqrt(2.0 * max(1.0, float(merged["damping"])))
        clip_norm = merged.get("clip_norm")
        if clip_norm is None or not 0 < clip_norm <= record_norm / BINDING_MARGIN:
            raise InvalidParameterError(
                f"the end-to-end audit needs an explicit clip_norm in (0, "
                f"{record_norm / BINDING_MARGIN:.3g}], far below the differing record's gradient "
                f"norm {record_norm:.3g}, so that clipping binds; got {clip_norm!r}."
            )
    merged["epsilon"] = check_epsilon(merged["epsilon"])
    merged["delta"] = check_delta(merged["delta"])
    return name, merged


def _schedule_kind(config: Mapping[str, Any]) -> str:
    schedule = config.get("schedule")
    return "sequential" if schedule is None else schedule["kind"]


# -- the batched method ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sides:
    """The recorded runs: D, D' and (Poisson) D0, D without z's influence."""

    private: release_paths.Capture
    neighbour: release_paths.Capture
    without: release_paths.Capture | None


def _capture_sides(pair: WorstCasePair, config: dict[str, Any], poisson: bool) -> _Sides:
    def run(data) -> release_paths.Capture:
        return release_paths.capture_run(
            pair.model, cross_entropy, pair.public, data, config, zero_releases=True
        )

    with release_paths.force_all_rows() if poisson else nullcontext():
        private, neighbour = run(pair.private), run(pair.neighbour)
        without = run(pair.without) if poisson else None
    return _Sides(private, neighbour, without)


def _log_density(mechanism: release_paths.RoundMechanism, w: np.ndarray, mean: np.ndarray):
    """log N(w; mean, Sigma) up to the constant both sides share: -||W (w - mean)||^2 / 2."""
    whitened = (w - mean) @ mechanism.whitener.T
    return -0.5 * np.sum(whitened * whitened, axis=1)


def _batched_statistics(
    sides: _Sides, n: int, poisson_rate: float | None
) -> tuple[np.ndarray, np.ndarray, list[float], float | None]:
    """(t on D, t on D', sensitivity attained per round, the pair's mu by the mechanisms' own
    means and covariance (Gaussian rounds)); releases drawn per round in one batch each."""
    stats = np.zeros((2, n))
    attained, pair_mu_sq = [], 0.0
    rounds = len(sides.private.mechanisms)
    inclusions = (
        None
        if poisson_rate is None
        else release_paths.poisson_inclusions((2, rounds, n), poisson_rate)
    )
    for t in range(rounds):
        mechanism = sides.private.mechanisms[t]
        S, S1 = sides.private.gradient_sums[t], sides.neighbour.gradient_sums[t]
        mechanisms = (mechanism, sides.neighbour.mechanisms[t])
        m, m1 = mechanism.mean(S), mechanism.mean(S1)
        if poisson_rate is None:
            draws = [mechanisms[0].draw(S, n), mechanisms[1].draw(S1, n)]
            shift = m1 - m
            precision_shift = mechanism.whitener.T @ (mechanism.whitener @ shift)
            for side in range(2):
                stats[side] += (draws[side] - (m + m1) / 2.0) @ precision_shift
            pair_mu_sq += float(shift @ precision_shift)
            bound = mechanism.multiplier * mechanism.per_example_bound
            attained.append(mechanism.dual_norm(S1 - S) / bound)
            continue
        S0 = sides.without.gradient_sums[t]
        m0 = mechanism.mean(S0)
        q = poisson_rate
        for side, (gradient_sum, own) in enumerate(((S, mechanisms[0]), (S1, mechanisms[1]))):
            included = inclusions[side, t]
            w = np.where(included[:, None], own.draw(gradient_sum, n), own.draw(S0, n))
            base = math.log1p(-q) + _log_density(mechanism, w, m0) if q < 1 else -np.inf
            with_d = np.logaddexp(base, math.log(q) + _log_density(mechanism, w, m))
            with_d1 = np.logaddexp(base, math.log(q) + _log_density(mechanism, w, m1))
            stats[side] += with_d1 - with_d
        attained.append(mechanism.dual_norm(S1 - S0) / mechanism.per_example_bound)
    return stats[0], stats[1], attained, None if poisson_rate is not None else math.sqrt(pair_mu_sq)


# -- the end-to-end method -----------------------------------------------------------------


def _end_to_end_statistics(
    pair: WorstCasePair, config: dict[str, Any], n: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """t = v^T (theta - theta0) of n full fine_tune runs on D and n on D' (interleaved), noise
    from operating-system entropy; only ``result.model`` is read. torch runs on one thread
    meanwhile: on the audit's 16-parameter model intra-op threads only add synchronisation."""
    stats = np.empty((2, n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in progress_bar(range(n), desc="audit releases", unit="pair", enabled=progress):
            for side, data in enumerate((pair.private, pair.neighbour)):
                result = release_paths.fine_tune(
                    pair.model, cross_entropy, pair.public, data, progress=False, **config
                )
                stats[side, i] = statistic(result.model, pair)
    finally:
        torch.set_num_threads(threads)
    return stats[0], stats[1]


# -- the audit -------------------------------------------------------------------------------


def run_audit(
    path: str | Mapping[str, Any] = "sequential",
    overrides: Mapping[str, Any] | None = None,
    *,
    n: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    end_to_end: bool = False,
    noise_scale: float | None = None,
    seeded_bug: str | None = None,
    split_seed: int = 0,
    progress: bool = False,
) -> AuditResult:
    """Audit one release path (a name of PATHS, or fine_tune keywords over the method's
    defaults; ``overrides``, e.g. {"epsilon": 2.0}, last) on its worst-case pair: n releases
    per dataset (default DEFAULT_N), the statistics and the verdict of the module docstring.
    ``noise_scale`` (audit-only) multiplies the mechanism's noise std and ``seeded_bug`` (a
    name of release_paths.SEEDED_BUGS) plants a fault, so that one can see the audit flag
    them. ``split_seed`` fixes the audit's own randomness (the held-out split of the eps
    bound); the mechanism's noise is never seeded."""
    method = "end_to_end" if end_to_end else "batched"
    n = DEFAULT_N[method] if n is None else int(n)
    if n < 20:
        raise InvalidParameterError(f"the audit needs n >= 20 releases per dataset, got {n}.")
    if not 0.5 < confidence < 1.0:
        raise InvalidParameterError(f"confidence must lie in (0.5, 1), got {confidence!r}.")
    if seeded_bug is not None and seeded_bug not in release_paths.SEEDED_BUGS:
        raise InvalidParameterError(
            f"unknown seeded bug {seeded_bug!r}; bugs: {sorted(release_paths.SEEDED_BUGS)}."
        )
    if noise_scale is not None and not noise_scale > 0:
        raise InvalidParameterError(f"noise_scale must be positive, got {noise_scale!r}.")
    name, config = audit_configuration(path, overrides, end_to_end=end_to_end)
    pure = config.get("mode", "gdp") == "pure"
    epsilon, delta = config["epsilon"], 0.0 if pure else config["delta"]
    adjacency = config.get("adjacency", "replace_one")
    kind = _schedule_kind(config)
    poisson = kind == "poisson"

    start = time.perf_counter()
    pair = worst_case_pair(adjacency)
    if pair.N is not None:
        config.setdefault("N", pair.N)
    accountant = attained = pair_mu = None
    with (
        release_paths.seeded_bug(seeded_bug),
        release_paths.scaled_noise(noise_scale) if noise_scale is not None else nullcontext(),
    ):
        if end_to_end:
            stat0, stat1 = _end_to_end_statistics(pair, config, n, progress)
        else:
            sides = _capture_sides(pair, config, poisson)
            report = sides.private.result.report.to_dict()
            rate = report["schedule"]["sampling_rate"] if poisson else None
            stat0, stat1, attained, pair_mu = _batched_statistics(sides, n, rate)
            if poisson:
                accountant = poisson_accountant(report["schedule"], adjacency)

    claimed_mu = None if (pure or poisson) else gdp_mu(epsilon, delta)
    mu = interval = None
    if claimed_mu is not None:
        mu, lo, hi = standardized_shift(stat0, stat1, confidence)
        interval = (lo, hi)
    bound = epsilon_lower_bound(stat0, stat1, delta, confidence, seed=split_seed)
    if claimed_mu is not None:
        tradeoff = lambda alpha: gaussian_tradeoff(alpha, claimed_mu)  # noqa: E731
    elif poisson:
        deltas = [accountant.get_delta(e) for e in EPSILON_GRID]
        tradeoff = profile_tradeoff(EPSILON_GRID, deltas)
    else:
        tradeoff = profile_tradeoff(np.array([epsilon]), np.array([0.0]))
    excess = tradeoff_excess(stat0, stat1, tradeoff, confidence)
    accountant_epsilon = None if accountant is None else float(accountant.get_epsilon(delta))

    reasons = []
    if claimed_mu is not None and interval[0] > claimed_mu:
        reasons.append(
            f"empirical mu {mu:.4f} [{interval[0]:.4f}, {interval[1]:.4f}] lies above the "
            f"claimed mu {claimed_mu:.4f}"
        )
    if bound.epsilon > epsilon:
        reasons.append(
            f"epsilon lower bound {bound.epsilon:.4f} exceeds the claimed epsilon {epsilon:g}"
        )
    if excess > 0:
        reasons.append(
            f"the empirical trade-off lies {excess:.4f} below the claimed trade-off curve"
        )
    if accountant_epsilon is not None and accountant_epsilon > epsilon * 1.01:
        reasons.append(
            f"the run's (z, q, T) spend epsilon {accountant_epsilon:.4f} > {epsilon:g} by an "
            "independent PLD computation"
        )
    return AuditResult(
        path=name,
        method=method,
        configuration=config,
        n=n,
        confidence=confidence,
        claimed_epsilon=epsilon,
        delta=delta,
        claimed_mu=claimed_mu,
        mu=mu,
        mu_interval=interval,
        pair_mu=pair_mu,
        epsilon_bound=bound,
        tradeoff_excess=excess,
        accountant_epsilon=accountant_epsilon,
        attained=[] if attained is None else [float(a) for a in attained],
        verdict="FAIL" if reasons else "PASS",
        reasons=reasons,
        seconds=time.perf_counter() - start,
        seeded_bug=seeded_bug,
        noise_scale=noise_scale,
        statistics=(stat0, stat1),
    )


def run_all(**options) -> list[AuditResult]:
    """``run_audit`` of every path of PATHS, in order."""
    return [run_audit(name, **options) for name in PATHS]
